#!/usr/bin/env node
// Bundle the CLI (dist/cli/entry.js, built by tsc first) into one CommonJS file,
// dist/cli/qcow.bundle.cjs, and record V8's compiled code for it in dist/cli/qcow.bundle.cache.
//
// Why: Node 20 spends ~45 ms loading the CLI as ~60 separate ES modules (resolving, reading and
// compiling each) before any work starts; qemu-img starts in ~5 ms. One file with a code cache
// starts in a fraction of that (bin/qcow.cjs loads the pair, checking that they belong together).
//
// The code cache holds the functions that ran while it was made, so it is made by running the
// common commands once on small images in a scratch folder (warmCache below), all in one process.
//
// Usage: node scripts/build-cli.mjs [--no-cache]
import { build } from 'esbuild';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';
import { Script } from 'node:vm';
import Module from 'node:module';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const outDir = join(root, 'dist', 'cli');
export const BUNDLE = join(outDir, 'qcow.bundle.cjs');
export const CACHE = join(outDir, 'qcow.bundle.cache');

// Each module's import.meta.url becomes its own file's URL in dist/ (worker scripts and the CLI
// path are found relative to it), not the bundle's.
const moduleUrls = {
  name: 'module-urls',
  setup(b) {
    b.onLoad({ filter: /[\\/]dist[\\/].*\.js$/ }, async (args) => {
      const text = await readFile(args.path, 'utf8');
      if (!text.includes('import.meta.url')) return undefined;
      const rel = relative(outDir, args.path).split('\\').join('/');
      return { contents: text.replaceAll('import.meta.url', `__qcowModuleUrl(${JSON.stringify(rel)})`), loader: 'js' };
    });
  },
};

// commander requires node:child_process at load (for executable subcommands, which we do not
// use); loading it pulls in net, dgram and streams: ~2 ms of every start. It gets a stand-in that
// loads the real module on first use.
const lazyChildProcess = {
  name: 'lazy-child-process',
  setup(b) {
    b.onResolve({ filter: /^(node:)?child_process$/ }, (args) => (/[\\/]commander[\\/]/.test(args.importer) ? { path: 'lazy-child-process', namespace: 'qcow-lazy' } : undefined));
    b.onLoad({ filter: /.*/, namespace: 'qcow-lazy' }, () => ({
      contents: "let real; module.exports = new Proxy({}, { get: (_, key) => (real ??= require('node:child_process'))[key] });",
      loader: 'js',
    }));
  },
};

export async function buildCli() {
  const result = await build({
    entryPoints: [join(root, 'dist', 'cli', 'entry.js')],
    outfile: BUNDLE,
    absWorkingDir: root,
    bundle: true,
    format: 'cjs',
    platform: 'node',
    target: 'node20',
    conditions: ['node'],
    // zstd-wasm loads its .wasm file from beside its own module: left in node_modules.
    // undici: only for http(s) images (src/storage/node-fetch.node.ts, deferred-ca.node.ts), so
    // it is required from node_modules then rather than parsed at every start.
    external: ['@bokuweb/zstd-wasm', 'undici'],
    // import() inside code run by vm.Script needs an import callback, which Node 20 only has as an
    // experimental feature (a warning on stderr) and which code from the cache loses: every
    // dynamic import becomes a require (all that is left outside the bundle is CommonJS).
    supported: { 'dynamic-import': false },
    banner: { js: "const __qcowModuleUrl = (rel) => require('node:url').pathToFileURL(require('node:path').join(__dirname, rel)).href;" },
    plugins: [moduleUrls, lazyChildProcess],
    // Half the bytes to read at every start (~3 ms). Function names are not kept: esbuild keeps
    // them by a defineProperty call each time a named closure is made, which cost 16 ms of a
    // 4 TiB qcow2 convert (a closure per refcount table entry). QCOW_DEBUG stack traces show
    // minified names; to debug with the real ones, run the unbundled dist/cli/main.js, or build
    // with QCOW_BUNDLE_NO_MINIFY=1 (for --cpu-prof profiles of the bundle as users run it).
    minify: !process.env.QCOW_BUNDLE_NO_MINIFY,
    metafile: true,
    logLevel: 'warning',
  });
  // The bundle's identity, which the code cache must carry too (see warmCache).
  const body = await readFile(BUNDLE, 'utf8');
  // A comment on the bundle's first line, not a line of its own, so the source map still fits.
  await writeFile(BUNDLE, `/* qcow-bundle ${createHash('sha256').update(body).digest('hex')} */${body}`);
  const bytes = result.metafile.outputs[relative(root, BUNDLE).split('\\').join('/')]?.bytes;
  if (/\bimport\(/.test(await readFile(BUNDLE, 'utf8'))) throw new Error(`${BUNDLE}: a dynamic import() was left in the bundle`);
  return { outfile: BUNDLE, bytes };
}

/** Compile the bundle as bin/qcow.cjs does, run common commands, save what V8 compiled. */
export async function warmCache() {
  const source = await readFile(BUNDLE, 'utf8');
  const script = new Script(Module.wrap(source), { filename: BUNDLE });
  const mod = { exports: {} };
  script.runInThisContext()(mod.exports, Module.createRequire(BUNDLE), mod, BUNDLE, outDir);
  const dir = await mkdtemp(join(tmpdir(), 'qcow-warm-'));
  const p = (f) => join(dir, f);
  const runs = [
    ['create', '-q', '-f', 'qcow2', p('a.qcow2'), '64M'],
    ['io', '-c', 'write -P 0x5a 0 3M', '-c', 'write -z 8M 1M', '-c', 'read -P 0x5a 0 64k', '-c', 'flush', p('a.qcow2')],
    ['info', p('a.qcow2')],
    ['info', '--output', 'json', '--backing-chain', p('a.qcow2')],
    ['map', '--output', 'json', p('a.qcow2')],
    ['check', p('a.qcow2')],
    ['convert', '-O', 'raw', p('a.qcow2'), p('a.raw')],
    ['convert', '-f', 'raw', '-O', 'qcow2', p('a.raw'), p('b.qcow2')],
    ['convert', '-c', '-O', 'qcow2', p('a.qcow2'), p('c.qcow2')],
    ['convert', '-O', 'qcow', p('a.qcow2'), p('d.qcow')],
    ['convert', '-O', 'raw', p('d.qcow'), p('d.raw')],
    ['compare', p('a.qcow2'), p('b.qcow2')],
    ['create', '-q', '-f', 'qcow2', '-b', p('a.qcow2'), '-F', 'qcow2', p('top.qcow2')],
    ['measure', '-O', 'qcow2', p('a.qcow2')],
    ['snapshot', '-l', p('a.qcow2')],
    ['bench', '-c', '200', '-d', '4', p('a.qcow2')],
    ['bench', '-w', '-c', '200', '-d', '4', p('b.qcow2')],
    ['resize', p('b.qcow2'), '128M'],
  ];
  // Commands print as they would for a user; the build log does not need that.
  const write = process.stdout.write;
  process.stdout.write = () => true;
  try {
    for (const args of runs) {
      process.exitCode = 0;
      await mod.exports.main([process.execPath, BUNDLE, ...args]);
      if (process.exitCode) throw new Error(`warming the code cache: qcow ${args.join(' ')} failed`);
    }
  } finally {
    process.stdout.write = write;
    process.exitCode = 0;
    await rm(dir, { recursive: true, force: true });
  }
  // The cache starts with the bundle's identity comment, the SHA-256 of its content (see
  // buildCli): bin/qcow.cjs uses the cache only with that very bundle, without hashing at start-up
  // (loading node:crypto alone costs ~6 ms). V8's own check compares lengths, not content.
  const id = source.slice(0, source.indexOf('*/') + 2);
  await writeFile(CACHE, Buffer.concat([Buffer.from(id), script.createCachedData()]));
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { bytes } = await buildCli();
  // No cache is slower, not wrong (bin/qcow.cjs compiles the bundle from source): a machine where
  // the warm-up cannot run (no writable temp folder, say) still gets a working install.
  await rm(CACHE, { force: true });
  if (!process.argv.includes('--no-cache')) {
    try {
      await warmCache();
    } catch (e) {
      await rm(CACHE, { force: true });
      console.warn(`cli bundle: no code cache (${e instanceof Error ? e.message : e}); start-up will be slower`);
    }
  }
  console.log(`cli bundle: ${BUNDLE} (${bytes} bytes)`);
  // Worker pools and handles opened by the commands would keep the process alive.
  process.exit(0);
}
