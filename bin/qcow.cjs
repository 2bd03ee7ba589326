#!/usr/bin/env node
'use strict';
/*
 * The `qcow` command. Start-up is most of the time of many qemu-img-sized jobs, so the CLI runs
 * from one bundled file (dist/cli/qcow.bundle.cjs, made by scripts/build-cli.mjs) compiled with
 * V8's code cache (dist/cli/qcow.bundle.cache): ~40 ms less than loading the ES modules of
 * dist/ one by one. The cache is used only when it was made from this very bundle: both start with
 * the same comment, the SHA-256 of the bundle's content. V8 rejects a cache made by another Node
 * version by itself.
 * Without the bundle, or when tsc has rebuilt dist/ since it was made (a developer's `tsc` without
 * `npm run build`: tsc rewrites every output file), the unbundled CLI runs instead.
 */
const { readFileSync, statSync } = require('node:fs');

// bin/qcow moved NODE_EXTRA_CA_CERTS out of Node's start-up (see there): this process loads the
// file when it first needs it, and processes it starts get the variable back as it was.
if (process.env.QCOW_DEFERRED_CA_CERTS && !process.env.NODE_EXTRA_CA_CERTS) process.env.NODE_EXTRA_CA_CERTS = process.env.QCOW_DEFERRED_CA_CERTS;

// libuv's file-I/O pool has 4 threads. On a 2-core machine 4 threads copying 2 MiB buffers, plus
// the main thread, only take the cores from each other: converting 1 GiB qcow2 to raw took 0.48 s
// with 4 and 0.39 s with 2 (qemu-img: 0.30 s). One thread per core, 2 to 4 (the default beyond);
// a UV_THREADPOOL_SIZE of the user's own wins. libuv reads it when the pool first starts, later.
if (!process.env.UV_THREADPOOL_SIZE) process.env.UV_THREADPOOL_SIZE = String(Math.max(2, Math.min(4, require('node:os').availableParallelism())));
const Module = require('node:module');
const { join } = require('node:path');
const { Script } = require('node:vm');

const dir = join(__dirname, '..', 'dist', 'cli');
const bundlePath = join(dir, 'qcow.bundle.cjs');

function loadBundle() {
  let source;
  try {
    if (statSync(bundlePath).mtimeMs < statSync(join(dir, 'entry.js')).mtimeMs) return undefined;
    source = readFileSync(bundlePath, 'utf8');
  } catch {
    return undefined;
  }
  let cachedData;
  try {
    const cache = readFileSync(join(dir, 'qcow.bundle.cache'));
    const id = Buffer.from(source.startsWith('/* qcow-bundle ') ? source.slice(0, source.indexOf('*/') + 2) : '');
    if (id.length > 0 && cache.length > id.length && id.equals(cache.subarray(0, id.length))) cachedData = cache.subarray(id.length);
  } catch {
    // No cache: compile from source.
  }
  // The bundle has no import() (build-cli.mjs turns them into require), so no import callback.
  const script = new Script(Module.wrap(source), { filename: bundlePath, cachedData });
  const mod = { exports: {} };
  script.runInThisContext()(mod.exports, Module.createRequire(bundlePath), mod, bundlePath, dir);
  return mod.exports;
}

const bundle = loadBundle();
if (bundle) bundle.main(process.argv);
else {
  import('../dist/cli/main.js').catch((e) => {
    process.stderr.write(`qcow: the command line is not built (npm run build): ${e && e.message ? e.message.split('\n')[0] : e}\n`);
    process.exitCode = 1;
  });
}
