#!/usr/bin/env node
// npm's install step: build the host addon (native/qcow_host.c) with node-gyp. A failed build
// (no compiler, no Node headers, not Linux) is not a failed install: qcow then uses its
// pure-TypeScript fallbacks (see src/host/native.node.ts), and says so in `qcow --version`.
// QCOW_NO_NATIVE=1 skips the build.
import { spawnSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
if (process.env.QCOW_NO_NATIVE === '1') {
  console.log('qcow: QCOW_NO_NATIVE=1: not building the host addon');
  process.exit(0);
}
if (process.platform !== 'linux') {
  console.log(`qcow: no host addon on ${process.platform} (Linux only): using the fallbacks`);
  process.exit(0);
}
// npm names its own node-gyp in npm_config_node_gyp when it runs install scripts; run by hand,
// this takes the node-gyp that ships with npm beside this Node.
const prefix = join(dirname(process.execPath), '..');
const gyp = process.env.npm_config_node_gyp ?? join(prefix, 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
const [cmd, args] = existsSync(gyp) ? [process.execPath, [gyp, 'rebuild']] : ['node-gyp', ['rebuild']];
// Build against the headers of the Node that runs us when they are installed beside it (Debian's
// nodejs, Node's own tarballs), rather than have node-gyp download them.
if (!process.env.npm_config_nodedir && existsSync(join(prefix, 'include', 'node', 'node_api.h'))) args.push(`--nodedir=${prefix}`);
const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit' });
if (r.status !== 0) {
  // Leave no half-built addon for the loader to trip on.
  rmSync(join(root, 'build'), { recursive: true, force: true });
  console.warn('qcow: could not build the host addon (see above); qcow works without it, with its own lock files instead of QEMU-compatible locks');
}
process.exit(0);
