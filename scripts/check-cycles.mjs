#!/usr/bin/env node
// Fails when the TypeScript modules under a folder (default src/) import each other in a circle.
// Every kind of import counts: static, type-only (a type cycle still ties two modules' designs
// together) and dynamic import() (lazy, but a module that loads its own importer is the same
// knot). Tests are left out. Run by `npm run lint`.
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';

const root = resolve(process.argv[2] ?? 'src');
const files = [];
(function walk(dir) {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) walk(path);
    else if (path.endsWith('.ts') && !path.endsWith('.d.ts') && !/\.test(-helpers)?\.ts$|\.test\.helpers\.ts$/.test(path)) files.push(path);
  }
})(root);

const patterns = [
  /^\s*(?:import|export)\s[^'";]*?\sfrom\s*['"](\.[^'"]+)['"]/gm, // import x from, import type, export ... from
  /^\s*import\s*['"](\.[^'"]+)['"]/gm, // side-effect import
  /\bimport\(\s*['"](\.[^'"]+)['"]\s*\)/g, // dynamic import
];
const graph = new Map();
for (const file of files) {
  const text = readFileSync(file, 'utf8');
  const deps = new Set();
  for (const re of patterns) for (const m of text.matchAll(re)) deps.add(resolve(dirname(file), m[1]).replace(/\.js$/, '.ts'));
  graph.set(file, [...deps].filter((d) => d !== file));
}

const state = new Map(); // 1: on the current path, 2: done
const path = [];
const cycles = [];
function visit(node) {
  state.set(node, 1);
  path.push(node);
  for (const dep of graph.get(node) ?? []) {
    if (!graph.has(dep)) continue;
    if (state.get(dep) === 1) cycles.push([...path.slice(path.indexOf(dep)), dep].map((f) => relative(root, f)).join(' -> '));
    else if (!state.has(dep)) visit(dep);
  }
  path.pop();
  state.set(node, 2);
}
for (const file of files) if (!state.has(file)) visit(file);
for (const c of cycles) console.error(`import cycle: ${c}`);
if (cycles.length > 0) process.exit(1);
