#!/usr/bin/env node
// Bundle the CLI (dist/cli/entry.js, built by tsc first) into CommonJS files, each with V8's
// compiled code for it beside it: dist/cli/qcow.bundle.cjs + .cache, the whole CLI, and one
// smaller pair per common command, dist/cli/qcow.cmd-NAME.cjs + .cache (see SPLIT).
//
// Why: Node 20 spends ~45 ms loading the CLI as ~60 separate ES modules (resolving, reading and
// compiling each) before any work starts; qemu-img starts in ~5 ms. One file with a code cache
// starts in a fraction of that (bin/qcow.cjs loads the pair, checking that they belong together).
// And on our VMs a process pays ~20-30 µs for each page of memory it touches first (docs/
// performance.md, "Fixed costs"): read into memory, every byte of the bundle was touched twice
// (read, then held as a string) and every byte of the cache twice (read, turned into V8 objects),
// so `info` reading the whole CLI's bundle and cache (1 MB) paid ~10 ms more than with a bundle of
// only what `qcow info` can run and a cache of only what it ran. The launcher now maps both
// through the host addon where it can (the page cache's pages, no copies: ~220 fewer first-touched
// pages for `info`), so what is left per byte is the cache's unpacking into V8 objects.
//
// The code cache holds the functions that ran while it was made, so it is made by running the
// common commands once on small images in a scratch folder (warmCache below), all in one process,
// each command through the bundle the launcher picks for it.
//
// Each bundle is written as one function expression taking CommonJS's five arguments, so the
// launcher compiles the file's text as it is (Module.wrap would make V8 copy the whole text into
// a new string first).
//
// Usage: node scripts/build-cli.mjs [--no-cache]
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative, resolve } from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { Script } from 'node:vm';
import Module from 'node:module';
import { readdir } from 'node:fs/promises';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const outDir = join(root, 'dist', 'cli');
const require = Module.createRequire(import.meta.url);
/** The launcher's choice of bundle, and of code cache beside the bundle's own, for a command line (bin/qcow.cjs). */
const { bundleFor, cacheVariantFor } = require('../bin/qcow.cjs');
export const BUNDLE = join(outDir, 'qcow.bundle.cjs');
export const CACHE = join(outDir, 'qcow.bundle.cache');

/**
 * Commands with a bundle of their own: the short ones scripts run often, whose time is mostly
 * start-up. The others (amend, backup, bitmap, commit, rebase, serve) run from the whole CLI's
 * bundle, as help, --version and unknown names do. `qemu-io` is the qemu-io persona's bundle
 * (compat/qemu-io); the qemu-img persona is in every command's bundle (compat/qemu-img runs the
 * command of the same name).
 */
export const SPLIT = ['info', 'check', 'map', 'measure', 'create', 'snapshot', 'compare', 'convert', 'io', 'resize', 'bench', 'qemu-io'];
const bundlePath = (name) => (name ? join(outDir, `qcow.cmd-${name}.cjs`) : BUNDLE);
const cachePath = (bundle, variant) => bundle.replace(/\.cjs$/, variant ? `.${variant}.cache` : '.cache');
/**
 * Code caches beside a bundle's own, each for the command lines bin/qcow.cjs's cacheVariantFor
 * gives its name: made from the warm-up runs before the `{ saveCache }` step of the same name.
 */
const CACHE_VARIANTS = [{ bundle: 'convert', variant: 'to-raw' }];
/**
 * The qemu-img persona's cache of a bundle (bin/qcow.cjs's cacheVariantFor gives it to every
 * persona command line), made from the warm-up's persona runs only, through a second copy of the
 * bundle: in the bundle's own cache, the persona's option parsing, messages and output were
 * unpacked by every plain `qcow info` (~45 KB of its 392 KB cache), `qcow check` (~75 KB of 420)
 * and `qcow convert`, which never run them. Made for the bundles that a persona run below goes
 * through; a persona command of another bundle takes that bundle's own cache (the launcher falls
 * back to it when there is no variant file).
 */
const PERSONA_VARIANT = 'qemu-img';

/** The five arguments CommonJS passes a module (what Module.wrap puts around it). */
const WRAP_HEAD = '(function (exports, require, module, __filename, __dirname) {';

/**
 * What each name the entry points export (dist/node.js, and dist/index.js through its
 * `export *`) is in the module that defines it: `{ file, name }` by exported name. The entry points
 * hold only `export { a, b as c } from './x.js'` and `export * from './y.js'` lines (besides
 * comments); anything else fails the build rather than being skipped.
 */
async function entryExports(file, seen = new Map()) {
  for (const line of (await readFile(file, 'utf8')).split('\n')) {
    if (line.trim() === '' || /^\s*(\/\/|\/\*|\*)/.test(line)) continue;
    const star = /^export \* from '([^']+)';$/.exec(line);
    const named = /^export \{([^}]*)\} from '([^']+)';$/.exec(line);
    if (star) await entryExports(join(dirname(file), star[1]), seen);
    else if (named) {
      for (const item of named[1].split(',').map((s) => s.trim()).filter(Boolean)) {
        const [name, as = name] = item.split(/\s+as\s+/);
        seen.set(as, { file: join(dirname(file), named[2]), name });
      }
    } else throw new Error(`${relative(root, file)}: a line the CLI bundle cannot see through: ${line}`);
  }
  return seen;
}

/**
 * The CLI imports the library only through its entry points (a lint rule sees to that). In the
 * bundle, that would tie every module to the entry point's one initialiser: the commands are
 * loaded late (import(), which esbuild wraps in an initialiser each), so the first import of
 * node.js from any command would set up every module the bundle holds, and the parts a command
 * loads only when asked (cli/open-images.ts, commands/convert-deferred.ts) would be set up at its
 * start. So, in the bundle only, each `import { ... } from '…/node.js'` (or index.js) of the CLI
 * and the QEMU front ends becomes imports from the modules that define the names: each module
 * is set up when its users are, as when the CLI imported them directly.
 */
function throughEntryPoints(text, file, exportsOf) {
  const entries = new Map([join(root, 'dist', 'node.js'), join(root, 'dist', 'index.js')].map((f) => [f, exportsOf.get(f)]));
  return text.replace(/^(import|export) \{([^}]*)\} from '([^']+)';$|\bfrom '([^']+)'|\bimport\('([^']+)'\)/gm, (whole, kind, items, spec, other, dynamic) => {
    const target = join(dirname(file), spec ?? other ?? dynamic);
    if (!entries.has(target)) return whole;
    if (spec === undefined) throw new Error(`${relative(root, file)}: ${whole}: only named imports and exports of an entry point can be bundled`);
    const names = entries.get(target);
    const byFile = new Map();
    for (const item of items.split(',').map((s) => s.trim()).filter(Boolean)) {
      const [name, as = name] = item.split(/\s+as\s+/);
      const origin = names.get(name);
      if (!origin) throw new Error(`${relative(root, file)}: ${name} is not exported by ${relative(root, target)}`);
      const list = byFile.get(origin.file) ?? [];
      list.push(origin.name === as ? as : `${origin.name} as ${as}`);
      byFile.set(origin.file, list);
    }
    const path = (f) => {
      const rel = relative(dirname(file), f).split('\\').join('/');
      return rel.startsWith('.') ? rel : `./${rel}`;
    };
    return [...byFile].map(([f, list]) => `${kind} { ${list.join(', ')} } from '${path(f)}';`).join(' ');
  });
}

// Each module's import.meta.url becomes its own file's URL in dist/ (worker scripts and the CLI
// path are found relative to it), not the bundle's; the CLI's imports of the entry points are
// resolved to the modules behind them (throughEntryPoints).
function distModules(exportsOf) {
  return {
    name: 'dist-modules',
    setup(b) {
      b.onLoad({ filter: /[\\/]dist[\\/].*\.js$/ }, async (args) => {
        const original = await readFile(args.path, 'utf8');
        let text = original;
        if (/[\\/]dist[\\/](cli|compat)[\\/]/.test(args.path)) text = throughEntryPoints(text, args.path, exportsOf);
        if (text.includes('import.meta.url')) {
          const rel = relative(outDir, args.path).split('\\').join('/');
          text = text.replaceAll('import.meta.url', `__qcowModuleUrl(${JSON.stringify(rel)})`);
        }
        return text === original ? undefined : { contents: text, loader: 'js' };
      });
    },
  };
}

/**
 * Node built-ins that bundled modules require at their top level but that a command seldom uses:
 * each importer listed gets a stand-in that loads the real module on first use, so a command that
 * never calls into it never loads it.
 * - child_process: commander requires it for executable subcommands, which we do not use; loading
 *   it pulls in net, dgram and streams: ~2 ms of every start.
 * - os: storage/lock.node.ts (tmpdir(), for lock files only where the host addon's OFD locks are
 *   missing) and compress/pool.node.ts (the CPU count, when a pool is made) import it at their
 *   top; loading it cost ~0.45 ms of every command. bin/qcow.cjs asks the addon for the CPU count.
 * - zlib, v8: compress/kernels.node.ts imports node:zlib for zlib clusters (only where the host
 *   addon's zlib is missing or is not node:zlib's own) and node:v8 for zstd's tiering flag (only
 *   for WebAssembly zstd). An image has clusters of one kind: node:zlib (which loads node:stream)
 *   cost a zstd convert ~5 ms and node:v8 a zlib one ~4 ms (compare, convert -c, convert of zlib
 *   or zstd images); with the addon, a zlib image loads neither.
 * - module: compress/pool.node.ts resolves the worker's file with createRequire, only when a
 *   worker starts; loading node:module (with the ES module loader's parts) cost ~0.6 ms.
 * The stand-in is an ES module exporting a forwarding function for each function of the real
 * module (esbuild would copy every key of a CommonJS stand-in into a namespace at the importer's
 * start, loading the real one). Other exports (os.EOL, os.constants) are not there: an ES import
 * of one fails the build (esbuild: no matching export), rather than loading the module early.
 */
const LAZY_BUILTINS = [
  { name: 'child_process', importer: /[\\/]commander[\\/]/ },
  { name: 'os', importer: /./ },
  { name: 'zlib', importer: /[\\/]compress[\\/]kernels\.node\.js$/ },
  { name: 'v8', importer: /[\\/]compress[\\/]kernels\.node\.js$/ },
  { name: 'module', importer: /[\\/]compress[\\/]pool\.node\.js$/ },
];
const lazyBuiltins = {
  name: 'lazy-builtins',
  setup(b) {
    for (const { name, importer } of LAZY_BUILTINS) {
      b.onResolve({ filter: new RegExp(`^(node:)?${name}$`) }, (args) => (args.namespace !== 'qcow-lazy' && importer.test(args.importer) ? { path: name, namespace: 'qcow-lazy' } : undefined));
    }
    b.onLoad({ filter: /.*/, namespace: 'qcow-lazy' }, (args) => {
      const real = require(`node:${args.path}`);
      const names = Object.keys(real).filter((k) => typeof real[k] === 'function' && /^[A-Za-z_$][\w$]*$/.test(k));
      return {
        contents: [
          'let real;',
          `const load = () => (real ??= require(${JSON.stringify(`node:${args.path}`)}));`,
          // Called or constructed, as the real function would be.
          'const lazy = (key) => function (...args) { const f = load()[key]; return new.target ? Reflect.construct(f, args, new.target) : Reflect.apply(f, this, args); };',
          ...names.map((k) => `export const ${k} = lazy(${JSON.stringify(k)});`),
        ].join('\n'),
        loader: 'js',
      };
    });
  },
};

/**
 * zstd-wasm's loader reads its .wasm file (250 KB) with node:fs/promises' readFile, once, at the
 * first zstd cluster; loading node:fs/promises (with the readline and directory modules it
 * brings) cost more than the read itself, ~3 ms. In the bundle its readFile is a synchronous read
 * from the page cache behind the same promise.
 */
const zstdWasmRead = {
  name: 'zstd-wasm-read',
  setup(b) {
    b.onResolve({ filter: /^(node:)?fs\/promises$/ }, (args) => (/[\\/]@bokuweb[\\/]zstd-wasm[\\/]/.test(args.importer) ? { path: 'fs/promises', namespace: 'qcow-zstd-read' } : undefined));
    b.onLoad({ filter: /.*/, namespace: 'qcow-zstd-read' }, () => ({
      contents: "const { readFileSync } = require('node:fs');\nexport const readFile = async (path) => readFileSync(path);\n",
      loader: 'js',
    }));
  },
};

/**
 * A command's bundle leaves out the other commands' modules (and the persona it cannot run): each
 * becomes a module that fails if it is ever loaded, which the launcher's choice rules out.
 */
function onlyCommand(name) {
  return {
    name: 'only-command',
    setup(b) {
      b.onResolve({ filter: /^\.\/commands\/[a-z-]+\.js$|^\.\.\/compat\/qemu-i[mo]g?\/main\.js$/ }, (args) => {
        const command = /^\.\/commands\/([a-z-]+)\.js$/.exec(args.path)?.[1];
        const persona = /^\.\.\/compat\/(qemu-i[mo]g?)\/main\.js$/.exec(args.path)?.[1];
        const keep = name === 'qemu-io' ? persona === 'qemu-io' : command === name || persona === 'qemu-img';
        return keep ? undefined : { path: args.path, namespace: 'qcow-left-out' };
      });
      b.onLoad({ filter: /.*/, namespace: 'qcow-left-out' }, (args) => ({
        contents: `throw new Error(${JSON.stringify(`internal error: ${args.path} is not in the ${name} bundle`)});`,
        loader: 'js',
      }));
    },
  };
}

/**
 * Write a bundle or a cache under a new name, then rename it over the old one: bin/qcow.cjs maps
 * these files (like shared libraries), and a running qcow reads its bundle's text for as long as
 * it runs (functions compiled late). Rewriting the file in place would change the code under it,
 * or cut it short (SIGBUS); a rename leaves the old file to the processes that have it mapped.
 */
async function replaceFile(path, data, encoding) {
  const tmp = `${path}.${process.pid}.tmp`;
  try {
    await writeFile(tmp, data, encoding);
    await rename(tmp, path);
  } finally {
    await rm(tmp, { force: true });
  }
}

/** zstd-wasm's WebAssembly file, beside the bundles that hold its loader (see buildCli). */
async function copyZstdWasm() {
  const pkg = dirname(require.resolve('@bokuweb/zstd-wasm'));
  await writeFile(join(outDir, 'zstd.wasm'), await readFile(join(pkg, 'zstd.wasm')));
  const loader = await readFile(require.resolve('@bokuweb/zstd-wasm'), 'utf8');
  if (!loader.includes("const { readFile } = require('fs/promises');")) throw new Error("@bokuweb/zstd-wasm no longer reads its .wasm file with require('fs/promises').readFile: check zstdWasmRead");
  if (!loader.includes("resolve(__dirname, './zstd.wasm')")) throw new Error('@bokuweb/zstd-wasm no longer reads ./zstd.wasm from __dirname: check how it finds its .wasm file');
}

/** Build the whole CLI's bundle (name undefined) or one command's (see SPLIT). */
export async function buildCli(name) {
  const outfile = bundlePath(name);
  const exportsOf = new Map();
  for (const f of ['node.js', 'index.js']) exportsOf.set(join(root, 'dist', f), await entryExports(join(root, 'dist', f)));
  const result = await build({
    entryPoints: [join(root, 'dist', 'cli', 'entry.js')],
    outfile,
    absWorkingDir: root,
    bundle: true,
    format: 'cjs',
    platform: 'node',
    target: 'node20',
    conditions: ['node'],
    // undici: only for http(s) images (src/storage/node-fetch.node.ts, deferred-ca.node.ts), so
    // it is required from node_modules then rather than parsed at every start. zstd-wasm is in
    // the bundle (its 8 small files cost ~10 ms to resolve, read and compile at its first use,
    // against ~1 ms from the code cache); it reads its .wasm file from `__dirname`, which in the
    // bundle is the launcher's dist/cli, where copyZstdWasm puts it.
    external: ['undici'],
    // import() inside code run by vm.Script needs an import callback, which Node 20 only has as an
    // experimental feature (a warning on stderr) and which code from the cache loses: every
    // dynamic import becomes a require (all that is left outside the bundle is CommonJS).
    supported: { 'dynamic-import': false },
    banner: { js: "const __qcowModuleUrl = (rel) => require('node:url').pathToFileURL(require('node:path').join(__dirname, rel)).href;" },
    plugins: [distModules(exportsOf), lazyBuiltins, zstdWasmRead, ...(name ? [onlyCommand(name)] : [])],
    // Half the bytes to read at every start (~3 ms). Function names are not kept: esbuild keeps
    // them by a defineProperty call each time a named closure is made, which cost 16 ms of a
    // 4 TiB qcow2 convert (a closure per refcount table entry). QCOW_DEBUG stack traces show
    // minified names; to debug with the real ones, run the unbundled dist/cli/main.js, or build
    // with QCOW_BUNDLE_NO_MINIFY=1 (for --cpu-prof profiles of the bundle as users run it: names
    // kept, only white space and comments go, which also keeps the text ASCII).
    ...(process.env.QCOW_BUNDLE_NO_MINIFY ? { minifyWhitespace: true } : { minify: true }),
    metafile: true,
    write: false,
    logLevel: 'warning',
  });
  const body = result.outputFiles[0].text;
  // The launcher reads the file as latin1 (the cheapest decoding); esbuild writes code as ASCII
  // (non-ASCII characters escaped) and minifying drops the comments that could hold others.
  if (/[^\x00-\x7f]/.test(body)) throw new Error(`${outfile}: not ASCII`);
  if (/\bimport\(/.test(body)) throw new Error(`${outfile}: a dynamic import() was left in the bundle`);
  // The bundle's identity (the SHA-256 of its content), which the code cache must carry too (see
  // warmCache), in a comment before the wrapper, on the first line so that line numbers stay.
  const id = `/* qcow-bundle ${createHash('sha256').update(body).digest('hex')} */`;
  await replaceFile(outfile, `${id}${WRAP_HEAD}${body}\n})`, 'latin1');
  const bytes = result.metafile.outputs[relative(root, outfile).split('\\').join('/')]?.bytes;
  // QCOW_BUNDLE_METAFILE=DIR keeps esbuild's account of each bundle (which modules it holds, and
  // how many bytes of each) to compare bundles before and after a change, or to read with
  // esbuild's analyzer.
  if (process.env.QCOW_BUNDLE_METAFILE) await writeFile(join(process.env.QCOW_BUNDLE_METAFILE, `${basename(outfile, '.cjs')}.meta.json`), JSON.stringify(result.metafile));
  return { outfile, bytes };
}

/** Compile a bundle as bin/qcow.cjs does (under another `filename`: see PERSONA_VARIANT); returns its script and its `main`. */
async function loadForWarming(file, filename = file) {
  const source = await readFile(file, 'latin1');
  const script = new Script(source, { filename });
  const mod = { exports: {} };
  script.runInThisContext()(mod.exports, Module.createRequire(file), mod, file, outDir);
  return { source, script, main: mod.exports.main };
}

/** Run common commands, each through the bundle the launcher picks; save what V8 compiled. */
export async function warmCache() {
  const bundles = new Map();
  for (const file of [BUNDLE, ...SPLIT.map(bundlePath)]) bundles.set(file, await loadForWarming(file));
  const dir = await mkdtemp(join(tmpdir(), 'qcow-warm-'));
  const p = (f) => join(dir, f);
  const runs = [
    ['create', '-q', '-f', 'qcow2', p('a.qcow2'), '64M'],
    ['io', '-c', 'write -P 0x5a 0 3M', '-c', 'write -z 8M 1M', '-c', 'read -P 0x5a 0 64k', '-c', 'flush', p('a.qcow2')],
    // An internal snapshot, as images of VMs often have: the snapshot table's decoding and
    // listing are then in the caches of info, check, map and the rest rather than compiled at
    // every start. Each command runs twice (below): `{n}` is a count, so the names differ.
    ['snapshot', '-c', 'warm-{n}', p('a.qcow2')],
    ['info', p('a.qcow2')],
    ['info', '--output', 'json', '--backing-chain', p('a.qcow2')],
    ['map', '--output', 'json', p('a.qcow2')],
    ['check', p('a.qcow2')],
    ['convert', '-O', 'raw', p('a.qcow2'), p('a.raw')],
    // The convert bundle's 'to-raw' cache (see bin/qcow.cjs, cacheVariantFor): what converts into
    // raw files run, qcow2 with zlib clusters too, and nothing of the writers. The zlib image is
    // made by the unbundled CLI in a process of its own, so that the convert bundle has not
    // compressed yet. (zstd clusters were tried too, where the addon decodes them with libzstd:
    // a zstd convert then compiled 2.4 KB from source instead of 6 KB, every raw convert unpacked
    // 3.7 KB more, and neither was measurably faster. Note that compressing zstd in this process
    // would set a V8 flag, a wasm tiering budget, under which V8 rejects every cache made here.)
    { args: ['convert', '-c', '-O', 'qcow2', p('a.qcow2'), p('z.qcow2')], unbundled: true },
    ['convert', '-O', 'raw', p('z.qcow2'), p('z.raw')],
    { saveCache: 'to-raw', bundle: 'convert' },
    ['convert', '-f', 'raw', '-O', 'qcow2', p('a.raw'), p('b.qcow2')],
    ['convert', '-c', '-O', 'qcow2', p('a.qcow2'), p('c.qcow2')],
    ['convert', '-O', 'qcow', p('a.qcow2'), p('d.qcow')],
    ['convert', '-O', 'raw', p('d.qcow'), p('d.raw')],
    // No zstd image here: a cache holding zstd's loader made every convert slower (its functions
    // are unpacked at each start) and a zstd one no faster than compiling them when used.
    ['compare', p('a.qcow2'), p('b.qcow2')],
    // Compressed clusters too: the first compare of a zlib image compiled ~17 KB of code (inflating
    // and the compressed-cluster reads) from source, which now comes from its cache.
    ['compare', p('a.qcow2'), p('z.qcow2')],
    ['create', '-q', '-f', 'qcow2', '-b', p('a.qcow2'), '-F', 'qcow2', p('top.qcow2')],
    ['measure', '-O', 'qcow2', p('a.qcow2')],
    ['snapshot', '-l', p('a.qcow2')],
    ['bench', '-c', '200', '-d', '4', p('a.qcow2')],
    ['bench', '-w', '-c', '200', '-d', '4', p('b.qcow2')],
    ['resize', p('b.qcow2'), '128M'],
    ['--persona=qemu-img', 'info', p('a.qcow2')],
    ['--persona=qemu-img', 'check', p('a.qcow2')],
    ['--persona=qemu-img', 'convert', '-O', 'raw', p('c.qcow2'), p('e.raw')],
    ['--persona=qemu-io', '-c', 'read 0 64k', '-c', 'write -P 0x11 0 64k', p('a.qcow2')],
  ];
  // Commands print as they would for a user; the build log does not need that.
  const write = process.stdout.write;
  process.stdout.write = () => true;
  const warmed = new Set();
  /** The variant caches made so far: path -> bytes (written with the bundles' own below). */
  const variants = new Map();
  /** The persona's copies of bundles (PERSONA_VARIANT): cache path -> loaded bundle. */
  const personas = new Map();
  /** Every cache but the variants above: path -> bytes (made at the end of the warm-up). */
  const made = new Map();
  let count = 0;
  // V8 drops the bytecode of functions that have not run for a few garbage collections, and a
  // cache holds only what is compiled when it is made: without this, what `info` ran early in the
  // warm-up was gone from its cache by the end, and compiled from source at every start instead
  // (~65 KB of its 260 KB). The flag is set back before the caches are made: V8 takes a cache
  // only under the flags it was made with (launcher.test.ts checks that it does).
  setFlagsFromString('--no-flush-bytecode');
  try {
    for (const step of runs) {
      if (!Array.isArray(step) && step.saveCache) {
        // A Script's cache can be taken at any time: this one holds what ran through it so far.
        // Under the flags the launcher runs with, as the caches below (see setFlagsFromString).
        const { source, script } = bundles.get(bundlePath(step.bundle));
        setFlagsFromString('--flush-bytecode');
        variants.set(cachePath(bundlePath(step.bundle), step.saveCache), cacheBytes(source, script));
        setFlagsFromString('--no-flush-bytecode');
        continue;
      }
      const args = Array.isArray(step) ? step : step.args;
      if (step.unbundled) {
        try {
          execFileSync(process.execPath, [join(outDir, 'main.js'), ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
        } catch (e) {
          throw new Error(`warming the code cache: qcow ${args.join(' ')} failed (unbundled): ${e.stderr?.toString().trim() || e.message}`);
        }
        continue;
      }
      const own = bundleFor([process.execPath, BUNDLE, ...args]);
      if (own && cacheVariantFor([process.execPath, BUNDLE, ...args]) === PERSONA_VARIANT) {
        // Through a copy of its own (see PERSONA_VARIANT), and the whole CLI's bundle as below.
        const path = cachePath(bundlePath(own), PERSONA_VARIANT);
        // Another file name: V8 would hand the same compiled functions to a second Script of the
        // same text and origin (its compilation cache), and the persona's cache would hold the
        // plain commands' code again. The name is not in the cache; V8 checks the text.
        if (!personas.has(path)) personas.set(path, await loadForWarming(bundlePath(own), `${bundlePath(own)}#${PERSONA_VARIANT}`));
        for (const [key, run] of [[path, personas.get(path)], [BUNDLE, bundles.get(BUNDLE)]]) {
          process.exitCode = 0;
          await run.main([process.execPath, BUNDLE, ...args.map((a) => a.replaceAll('{n}', String(count++)))]);
          if (process.exitCode) throw new Error(`warming the code cache: qcow ${args.join(' ')} failed (${relative(root, key)})`);
        }
        warmed.add(BUNDLE);
        continue;
      }
      const expected = CACHE_VARIANTS.find((v) => v.bundle === own && !variants.has(cachePath(bundlePath(own), v.variant)));
      if (expected && cacheVariantFor([process.execPath, BUNDLE, ...args]) !== expected.variant) {
        throw new Error(`warming the code cache: qcow ${args.join(' ')} would go into the ${expected.variant} cache of ${own}, which the launcher does not use for it`);
      }
      // The whole CLI's bundle too: the commands without a bundle of their own share most code.
      for (const file of new Set([own ? bundlePath(own) : BUNDLE, BUNDLE])) {
        const argv = [process.execPath, BUNDLE, ...args.map((a) => a.replaceAll('{n}', String(count++)))];
        process.exitCode = 0;
        await bundles.get(file).main(argv);
        if (process.exitCode) throw new Error(`warming the code cache: qcow ${args.join(' ')} failed (${relative(root, file)})`);
        warmed.add(file);
      }
    }
    // Every cache now, in one synchronous pass, under the launcher's flags: with bytecode flushing
    // back on, each major garbage collection ages the functions that have not run since, and a
    // function old enough loses its bytecode. The caches were taken one by one between file
    // writes before, and the last ones made (bench, qemu-io) came out with a quarter of their
    // functions missing in some builds (486 KB -> 363 KB for qemu-io's: +550 page faults and ~30
    // ms of compiling at every `qemu-io -c read`), as the warm-up grew.
    setFlagsFromString('--flush-bytecode');
    for (const [path, { source, script }] of personas) made.set(path, cacheBytes(source, script));
    for (const [file, { source, script }] of bundles) {
      if (!warmed.has(file)) throw new Error(`warming the code cache: no command ran through ${relative(root, file)}`);
      made.set(cachePath(file), cacheBytes(source, script));
    }
  } finally {
    setFlagsFromString('--flush-bytecode');
    process.stdout.write = write;
    process.exitCode = 0;
    await rm(dir, { recursive: true, force: true });
  }
  for (const { bundle, variant } of CACHE_VARIANTS) {
    const path = cachePath(bundlePath(bundle), variant);
    if (!variants.has(path)) throw new Error(`warming the code cache: no ${variant} cache made for ${bundle}`);
    await replaceFile(path, variants.get(path));
  }
  for (const [path, bytes] of made) await replaceFile(path, bytes);
}

/**
 * A cache file: the bundle's identity comment, the SHA-256 of its content (see buildCli), then
 * what V8 compiled for it. bin/qcow.cjs uses the cache only with that very bundle, without hashing
 * at start-up (loading node:crypto alone costs ~6 ms). V8's own check compares lengths, not content.
 * The data starts at the next multiple of 8 after it (spaces between): V8 copies cached data that
 * is not 8-byte aligned before reading it, and a file read lands on an aligned buffer.
 */
function cacheBytes(source, script) {
  const id = source.slice(0, source.indexOf('*/') + 2);
  const head = id.padEnd(Math.ceil(id.length / 8) * 8, ' ');
  return Buffer.concat([Buffer.from(head, 'latin1'), script.createCachedData()]);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  // Bundles of commands no longer split off (or from an older layout) would be picked up by the
  // launcher with stale code: only this build's files stay.
  for (const f of await readdir(outDir)) if (/^qcow\.cmd-.*\.(cjs|cache)$/.test(f)) await rm(join(outDir, f), { force: true });
  await copyZstdWasm();
  const built = [];
  for (const name of [undefined, ...SPLIT]) built.push(await buildCli(name));
  // No cache is slower, not wrong (bin/qcow.cjs compiles the bundle from source): a machine where
  // the warm-up cannot run (no writable temp folder, say) still gets a working install.
  const removeCaches = async () => {
    for (const { outfile } of built) await rm(cachePath(outfile), { force: true });
    for (const { bundle, variant } of CACHE_VARIANTS) await rm(cachePath(bundlePath(bundle), variant), { force: true });
    for (const name of SPLIT) await rm(cachePath(bundlePath(name), PERSONA_VARIANT), { force: true });
  };
  await removeCaches();
  if (!process.argv.includes('--no-cache')) {
    try {
      await warmCache();
    } catch (e) {
      await removeCaches();
      console.warn(`cli bundle: no code cache (${e instanceof Error ? e.message : e}); start-up will be slower`);
    }
  }
  console.log(`cli bundles: ${built.map(({ outfile, bytes }) => `${relative(outDir, outfile)} ${bytes}`).join(', ')} bytes`);
  // Worker pools and handles opened by the commands would keep the process alive.
  process.exit(0);
}
