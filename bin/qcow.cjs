#!/usr/bin/env node
'use strict';
/*
 * The `qcow` command. Start-up is most of the time of many qemu-img-sized jobs, so the CLI runs
 * from one bundled file compiled with V8's code cache (both made by scripts/build-cli.mjs): ~40 ms
 * less than loading the ES modules of dist/ one by one. Common commands have a bundle and cache of
 * their own (dist/cli/qcow.cmd-NAME.cjs and .cache: a third to a half of the whole CLI's, whose
 * reading and unpacking cost ~10 ms more); the rest run from dist/cli/qcow.bundle.cjs and .cache.
 * Both files are mapped rather than read where the host addon is built (see loadAddon), so they
 * are replaced by rename, never rewritten in place (build-cli.mjs does so).
 * A cache is used only when it was made from that very bundle: both start with the same comment,
 * the SHA-256 of the bundle's content. V8 rejects a cache made by another Node version by itself.
 * Without the bundle, or when tsc has rebuilt dist/ since it was made (a developer's `tsc -b`
 * without `npm run build`), the unbundled CLI runs instead. tsc builds src/ incrementally and
 * rewrites only the outputs that changed, so the mark of a rebuild is its build-info file
 * (dist/.tsbuildinfo, rewritten by every build that changed something; not in the package).
 */
const { readFileSync, statSync } = require('node:fs');
const { join } = require('node:path');
const { Script } = require('node:vm');

const dir = join(__dirname, '..', 'dist', 'cli');

/**
 * The command's own bundle for this command line (scripts/build-cli.mjs makes one for each common
 * command, holding only what that command can run): the command word, or the qemu-img persona's
 * command word after its global options, or `qemu-io` for that persona. Undefined: the whole CLI.
 */
function bundleFor(argv) {
  let i = 2;
  if (argv[2] === '--persona=qemu-io') return 'qemu-io';
  if (argv[2] === '--persona=qemu-img') {
    // qemu-img's global options, as compat/qemu-img scans them: -T and --trace take a value.
    for (i = 3; argv[i] !== undefined && argv[i].startsWith('-'); i++) if (argv[i] === '-T' || argv[i] === '--trace') i++;
  }
  const word = argv[i];
  return word !== undefined && /^[a-z]+$/.test(word) ? word : undefined;
}

/**
 * Which of its bundle's code caches a command line takes, beside the bundle's own: 'qemu-img' for
 * the qemu-img persona's command lines (made of the persona's runs only, where the bundle's own
 * cache holds none of the persona's code: see build-cli.mjs, PERSONA_VARIANT), 'to-raw' for
 * a `convert` into a raw file without -c (-O raw, or no -O: raw is the default). That cache holds
 * what converts from qcow2 (plain and zlib) into raw files ran, 393 KB against the 559 KB of
 * the whole convert cache, whose qcow2 and qcow writers such a convert never runs, and V8 unpacks
 * every function of a cache at start: a 3 MiB qcow2 -> raw convert took ~93 fewer page faults,
 * ~6M fewer instructions and ~3 ms less CPU (2026-12-06, against the whole cache). Other converts
 * keep the whole cache: compiling the writers from source cost a qcow2 target ~6 ms more than
 * unpacking them. A guess that is wrong costs time only, so anything unclear (a cluster of short
 * options with c or O in it) takes the whole cache. Undefined: the bundle's own.
 */
function cacheVariantFor(argv) {
  if (argv[2] === '--persona=qemu-img') return 'qemu-img';
  if (argv[2] !== 'convert') return undefined;
  for (let i = 3; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') break;
    if (a === '-O' || a === '--output-format') {
      if (argv[++i] !== 'raw') return undefined;
    } else if (a.startsWith('--output-format=')) {
      if (a !== '--output-format=raw') return undefined;
    } else if (a === '--compress' || (/^-[^-]/.test(a) && /[cO]/.test(a) && a !== '-Oraw')) return undefined;
  }
  return 'to-raw';
}

/**
 * The host addon (native/qcow_host.c; src/host/native.node.ts loads it for the library too), or
 * undefined: not built, not loadable, or turned off with QCOW_NO_NATIVE=1. The launcher maps the
 * bundle and its cache with it: read() into fresh memory cost `info` ~220 first-touched pages
 * (~4 ms on our VMs) that a mapping of the page cache's pages does not.
 */
function loadAddon() {
  if (process.env.QCOW_NO_NATIVE === '1') return undefined;
  try {
    const mod = { exports: {} };
    process.dlopen(mod, join(__dirname, '..', 'build', 'Release', 'qcow_host.node'));
    return mod.exports;
  } catch {
    return undefined;
  }
}

/**
 * The file's bytes as a latin1 string: mapped where the addon can (V8 reads the text in place, and
 * only the pages it reads), else read. The bundles are ASCII (build-cli.mjs checks), so both give
 * the same string; latin1 is the cheapest decoding of a read.
 */
function readText(addon, path) {
  const mapped = typeof addon?.mapText === 'function' ? addon.mapText(path) : undefined;
  return mapped ?? readFileSync(path, 'latin1');
}

/** The file's bytes: a private mapping where the addon can, else read. */
function readBytes(addon, path) {
  return typeof addon?.mapBytes === 'function' ? addon.mapBytes(path) : readFileSync(path);
}

/**
 * Compile and run one bundle, with its code cache `variant` where there is one (cacheVariantFor),
 * else its own; undefined when the bundle is missing or older than dist/ (a bare tsc).
 */
function loadBundle(addon, bundlePath, variant) {
  let source;
  try {
    const built = statSync(join(dir, '..', '.tsbuildinfo'), { throwIfNoEntry: false });
    if (statSync(bundlePath).mtimeMs < Math.max(statSync(join(dir, 'entry.js')).mtimeMs, built?.mtimeMs ?? 0)) return undefined;
    source = readText(addon, bundlePath);
  } catch {
    return undefined;
  }
  let cachedData;
  try {
    const base = bundlePath.slice(0, -'.cjs'.length);
    let cache;
    if (variant !== undefined) {
      try {
        cache = readBytes(addon, `${base}.${variant}.cache`);
      } catch {
        // Built without it: the bundle's own cache serves.
      }
    }
    cache ??= readBytes(addon, `${base}.cache`);
    const id = Buffer.from(source.startsWith('/* qcow-bundle ') ? source.slice(0, source.indexOf('*/') + 2) : '', 'latin1');
    // The data starts at the first multiple of 8 after the identity: V8 copies unaligned data.
    const start = Math.ceil(id.length / 8) * 8;
    if (id.length > 0 && cache.length > start && id.equals(cache.subarray(0, id.length))) cachedData = cache.subarray(start);
  } catch {
    // No cache: compile from source.
  }
  // The bundle is one function expression taking CommonJS's arguments (build-cli.mjs wraps it)
  // and has no import() (build-cli.mjs turns them into require), so no import callback.
  const script = new Script(source, { filename: bundlePath, cachedData });
  const mod = { exports: {} };
  // The bundle requires only Node's modules and packages by name (undici), which resolve the same
  // from bin/ as from dist/cli/ (one package root): this file's own require serves, where
  // Module.createRequire cost ~0.3 ms.
  script.runInThisContext()(mod.exports, require, mod, bundlePath, dir);
  return mod.exports;
}

function start() {
  // bin/qcow moved NODE_EXTRA_CA_CERTS out of Node's start-up (see there): this process loads the
  // file when it first needs it, and processes it starts get the variable back as it was.
  if (process.env.QCOW_DEFERRED_CA_CERTS && !process.env.NODE_EXTRA_CA_CERTS) process.env.NODE_EXTRA_CA_CERTS = process.env.QCOW_DEFERRED_CA_CERTS;
  // bin/qcow's malloc tunables are for this process only (glibc read them at its start).
  if (process.env.QCOW_OWN_GLIBC_TUNABLES === '1') {
    delete process.env.GLIBC_TUNABLES;
    delete process.env.QCOW_OWN_GLIBC_TUNABLES;
  }

  // libuv's file-I/O pool has 4 threads. On a 2-core machine 4 threads copying 2 MiB buffers, plus
  // the main thread, only take the cores from each other: converting 1 GiB qcow2 to raw took 0.48 s
  // with 4 and 0.39 s with 2 (qemu-img: 0.30 s). One thread per core, 2 to 4 (the default beyond);
  // a UV_THREADPOOL_SIZE of the user's own wins. libuv reads it when the pool first starts, later.
  // The addon counts the CPUs when it is there: node:os, loaded for that alone, cost ~0.45 ms.
  const addon = loadAddon();
  if (!process.env.UV_THREADPOOL_SIZE) {
    const cpus = typeof addon?.availableParallelism === 'function' ? addon.availableParallelism() : require('node:os').availableParallelism();
    process.env.UV_THREADPOOL_SIZE = String(Math.max(2, Math.min(4, cpus)));
  }
  const own = bundleFor(process.argv);
  // A word that is no command with a bundle of its own costs one failed stat.
  const bundle = (own !== undefined ? loadBundle(addon, join(dir, `qcow.cmd-${own}.cjs`), cacheVariantFor(process.argv)) : undefined) ?? loadBundle(addon, join(dir, 'qcow.bundle.cjs'));
  // The addon goes to the library too, which would otherwise load it a second time.
  if (bundle) bundle.main(process.argv, { hostAddon: addon });
  else {
    import('../dist/cli/main.js').catch((e) => {
      process.stderr.write(`qcow: the command line is not built (npm run build): ${e && e.message ? e.message.split('\n')[0] : e}\n`);
      process.exitCode = 1;
    });
  }
}

// scripts/build-cli.mjs asks which bundle (and cache) each command it warms the caches with runs in.
if (require.main === module) start();
else module.exports = { bundleFor, cacheVariantFor };
