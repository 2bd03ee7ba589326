#!/usr/bin/env node
// Bundle the browser entry (dist/browser/index.js, built by tsc first) into one ES module,
// dist/browser/qcow.js, with the zstd WebAssembly file beside it.
//
// The package's "imports" (#compress, #crypto) pick their browser files through the "browser" /
// "default" conditions; "node" is never set here, so a node: import anywhere in the graph makes
// esbuild fail instead of shipping a bundle that breaks in the page.
//
// Usage: node scripts/build-browser.mjs [--outdir DIR] [--no-minify]
import { build } from 'esbuild';
import { copyFile, mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/**
 * Bundle one browser entry (built by tsc first) into one ES module in `outdir`, refusing any node:
 * import, with zstd's WebAssembly file beside it: @bokuweb/zstd-wasm's browser build loads
 * ./zstd.wasm relative to the module that runs it (taken from the folder of the zstd module that
 * was bundled).
 */
async function bundleForBrowser({ entry, outdir, outname, what, minify, sourcemap }) {
  await mkdir(outdir, { recursive: true });
  const result = await build({
    entryPoints: [entry],
    outfile: join(outdir, outname),
    absWorkingDir: root,
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'es2022',
    conditions: ['browser'],
    minify,
    sourcemap,
    metafile: true,
    logLevel: 'warning',
  });
  const nodeInputs = Object.keys(result.metafile.inputs).filter((p) => p.startsWith('node:'));
  if (nodeInputs.length > 0) throw new Error(`the ${what} pulls in Node modules: ${nodeInputs.join(', ')}`);
  const zstdModule = Object.keys(result.metafile.inputs).find((p) => /@bokuweb[/\\]zstd-wasm[/\\].*index\.web\.js$/.test(p));
  if (zstdModule) await copyFile(join(root, dirname(zstdModule), 'zstd.wasm'), join(outdir, 'zstd.wasm'));
  const output = Object.keys(result.metafile.outputs).find((k) => k.endsWith(outname));
  return { outfile: join(outdir, outname), bytes: result.metafile.outputs[output].bytes };
}

export async function buildBrowser({ outdir = join(root, 'dist', 'browser'), minify = true } = {}) {
  return bundleForBrowser({ entry: join(root, 'dist', 'browser', 'index.js'), outdir, outname: 'qcow.js', what: 'browser bundle', minify, sourcemap: true });
}

// The image viewer page (src/web): its script bundled the same way into dist/web/app.js, with its
// HTML beside it, so dist/web can be served by any static server.
export async function buildViewer({ outdir = join(root, 'dist', 'web'), minify = true } = {}) {
  const built = await bundleForBrowser({ entry: join(root, 'dist', 'web', 'page.js'), outdir, outname: 'app.js', what: 'viewer bundle', minify, sourcemap: false });
  await copyFile(join(root, 'src', 'web', 'index.html'), join(outdir, 'index.html'));
  return built;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const at = args.indexOf('--outdir');
  const outdir = at >= 0 ? resolve(args[at + 1]) : undefined;
  const { outfile, bytes } = await buildBrowser({ outdir, minify: !args.includes('--no-minify') });
  process.stdout.write(`browser bundle: ${outfile} (${bytes} bytes)\n`);
  // The viewer is part of the package's build (npm run build), not of a test's --outdir bundle.
  if (at < 0) process.stdout.write(`viewer page: ${(await buildViewer({ minify: !args.includes('--no-minify') })).outfile}\n`);
}
