/**
 * bin/qcow.cjs runs the CLI from a bundle that `npm run build` makes, compiled from V8's code
 * cache (see scripts/build-cli.mjs): the whole CLI's, or a common command's own. These check that
 * the build left pairs that belong together and that V8 takes each cache, since a rejected cache
 * costs every command ~25 ms without failing, and that the launcher picks the command's bundle.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Script } from 'node:vm';
import { hostAddon } from '#src/host/native.node.js';
import { nativeZlibOf, nativeZstdOf } from '#src/compress/kernels.node.js';
import { QCOW_BIN, run } from '../support/qemu.js';

const dir = join(import.meta.dirname, '..', '..', 'dist', 'cli');
const launcher = join(dir, '..', '..', 'bin', 'qcow.cjs');
const bundles = readdirSync(dir).filter((f) => /^qcow\.(bundle|cmd-[a-z-]+)\.cjs$/.test(f));
const { bundleFor, cacheVariantFor } = createRequire(import.meta.url)(launcher) as {
  bundleFor: (argv: string[]) => string | undefined;
  cacheVariantFor: (argv: string[]) => string | undefined;
};
/** Each bundle's own cache, and the caches of it for some command lines (qcow.cmd-convert.to-raw.cache). */
const caches = (bundle: string) => readdirSync(dir).filter((f) => f === bundle.replace(/\.cjs$/, '.cache') || (f.startsWith(bundle.replace(/\.cjs$/, '.')) && /^[a-z-]+\.cache$/.test(f.slice(bundle.length - 3))));

test('every bundle and its code caches carry the same identity comment, and V8 accepts the caches', () => {
  assert.ok(bundles.includes('qcow.bundle.cjs') && bundles.includes('qcow.cmd-info.cjs'), bundles.join(' '));
  assert.deepEqual(caches('qcow.cmd-convert.cjs').sort(), ['qcow.cmd-convert.cache', 'qcow.cmd-convert.qemu-img.cache', 'qcow.cmd-convert.to-raw.cache']);
  for (const [name, cacheName] of bundles.flatMap((b) => caches(b).map((c) => [b, c] as const))) {
    const source = readFileSync(join(dir, name), 'latin1');
    const cache = readFileSync(join(dir, cacheName));
    const id = source.slice(0, source.indexOf('*/') + 2);
    assert.match(id, /^\/\* qcow-bundle [0-9a-f]{64} \*\/$/, name);
    assert.equal(cache.subarray(0, id.length).toString(), id, name);
    // Compiled as the launcher does: the file is one function expression, not Module.wrap'ped.
    // The data starts 8-byte aligned after the identity (V8 would copy it otherwise).
    assert.equal(cache.subarray(id.length, Math.ceil(id.length / 8) * 8).toString().trim(), '', name);
    const script = new Script(source, { filename: join(dir, name), cachedData: cache.subarray(Math.ceil(id.length / 8) * 8) });
    assert.equal(script.cachedDataRejected, false, cacheName);
    assert.equal(typeof script.runInThisContext(), 'function', cacheName);
  }
});

test('the bundles have no import() left: code run by vm.Script has no import callback', () => {
  for (const name of bundles) assert.doesNotMatch(readFileSync(join(dir, name), 'latin1'), /\bimport\(/, name);
});

test('the launcher picks the bundle of the command, also behind the qemu-img persona', () => {
  const pick = (...args: string[]) => bundleFor(['node', 'qcow', ...args]);
  assert.equal(pick('info', 'x.qcow2'), 'info');
  assert.equal(pick('convert', '-O', 'raw', 'a', 'b'), 'convert');
  assert.equal(pick('--persona=qemu-img', '-T', 'trace-event', 'check', 'x'), 'check');
  assert.equal(pick('--persona=qemu-img', '--trace=x', 'map', 'x'), 'map');
  assert.equal(pick('--persona=qemu-io', '-c', 'read 0 64k', 'x'), 'qemu-io');
  assert.equal(pick('--persona=qemu-img', '--version'), undefined);
  assert.equal(pick('--help'), undefined);
  assert.equal(pick('/some/file'), undefined);
});

test('converts into raw files take the convert cache made of such converts; other command lines the bundle\'s own', () => {
  const pick = (...args: string[]) => cacheVariantFor(['node', 'qcow', ...args]);
  assert.equal(pick('convert', 'a.qcow2', 'b.raw'), 'to-raw');
  assert.equal(pick('convert', '-f', 'qcow2', '-O', 'raw', '-m', '4', 'a.qcow2', 'b.raw'), 'to-raw');
  assert.equal(pick('convert', '--output-format=raw', 'a', 'b'), 'to-raw');
  assert.equal(pick('convert', '-Oraw', 'a', 'b'), 'to-raw');
  // Writers of other formats, compressing, and what the launcher cannot tell apart: the whole cache.
  assert.equal(pick('convert', '-O', 'qcow2', 'a', 'b'), undefined);
  assert.equal(pick('convert', '-Oqcow2', 'a', 'b'), undefined);
  assert.equal(pick('convert', '--output-format', 'vmdk', 'a', 'b'), undefined);
  assert.equal(pick('convert', '-c', 'a', 'b'), undefined);
  assert.equal(pick('convert', '-pc', 'a', 'b'), undefined);
  assert.equal(pick('convert', '--compress', 'a', 'b'), undefined);
  assert.equal(pick('info', 'a'), undefined);
});

test('the qemu-img persona\'s command lines take a cache of the persona\'s runs; the bundle\'s own holds none of its code', () => {
  const pick = (...args: string[]) => cacheVariantFor(['node', 'qcow', ...args]);
  assert.equal(pick('--persona=qemu-img', 'convert', '-O', 'raw', 'a', 'b'), 'qemu-img');
  assert.equal(pick('--persona=qemu-img', 'info', 'a'), 'qemu-img');
  assert.equal(pick('--persona=qemu-img', '-T', 'x', 'check', 'a'), 'qemu-img');
  assert.equal(pick('--persona=qemu-io', '-c', 'read 0 64k', 'a'), undefined);
  for (const name of ['info', 'check', 'convert']) assert.ok(existsSync(join(dir, `qcow.cmd-${name}.qemu-img.cache`)), name);
  for (const name of ['info', 'check']) {
    // The persona's own code (its option scanning, messages and output) is in its cache only:
    // a plain command's cache is the smaller by it.
    const own = readFileSync(join(dir, `qcow.cmd-${name}.cache`)).length;
    const persona = readFileSync(join(dir, `qcow.cmd-${name}.qemu-img.cache`)).length;
    assert.ok(own < persona, `${name}: ${own} ${persona}`);
  }
});

test('a command whose bundle leaves out the others still runs them from the whole CLI when asked', async () => {
  // `amend` has no bundle of its own: the launcher falls back to the whole CLI's.
  const r = await run(process.execPath, [launcher, 'amend', '-f', 'qcow2', '-o', 'help', 'no-such.qcow2']);
  assert.match(r.stdout, /^Amend options for 'qcow2':/);
});

test('bin/qcow.cjs runs commands through the bundle with nothing extra on stderr', async () => {
  const version = await run(process.execPath, [launcher, '--version']);
  assert.equal(version.code, 0);
  assert.match(version.stdout, /^\d+\.\d+\.\d+\nimage locking: [^\n]+\ncodecs: [^\n]+\n$/);
  assert.equal(version.stderr, '');
  const bad = await run(process.execPath, [launcher, 'info', '--output', 'yaml', 'x']);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^qcow: [^\n]+\n$/);
});

test('the addon maps a file as the launcher reads it: the same text and bytes, private writes, errors as node:fs', async (t) => {
  const addon = hostAddon();
  const { mapText, mapBytes } = addon ?? {};
  if (!addon?.availableParallelism || !mapText || !mapBytes) return t.skip('the host addon (version 4) is not built');
  const dirTmp = await mkdtemp(join(tmpdir(), 'qcow-map-'));
  try {
    const file = join(dirTmp, 'f.bin');
    // Every byte value: mapText is latin1, as readFileSync(..., 'latin1').
    const bytes = Buffer.from(Array.from({ length: 3 * 4096 + 17 }, (_, i) => (i * 7) & 0xff));
    writeFileSync(file, bytes);
    const text = mapText(file);
    if (text === undefined) return t.skip('this Node has no external strings');
    assert.equal(text, readFileSync(file, 'latin1'));
    const mapped = mapBytes(file);
    assert.ok(mapped.equals(bytes));
    // The mapping is copy-on-write: writing into the Buffer leaves the file and the text as they were.
    mapped.fill(0xee, 0, 4096);
    assert.ok(readFileSync(file).equals(bytes));
    assert.equal(text.charCodeAt(1), 7);
    const empty = join(dirTmp, 'empty');
    writeFileSync(empty, '');
    assert.equal(mapText(empty), '');
    assert.equal(mapBytes(empty).length, 0);
    assert.throws(() => mapText(join(dirTmp, 'missing')), { code: 'ENOENT', syscall: 'open' });
    assert.throws(() => mapBytes(dirTmp), { code: 'EISDIR' });
    assert.equal(addon.availableParallelism(), availableParallelism());
  } finally {
    await rm(dirTmp, { recursive: true, force: true });
  }
});

test('the bundle runs the same with the files mapped and read (QCOW_NO_NATIVE=1)', async () => {
  const dirTmp = await mkdtemp(join(tmpdir(), 'qcow-launch-'));
  try {
    const image = join(dirTmp, 'a.qcow2');
    assert.equal((await run(process.execPath, [launcher, 'create', '-q', '-f', 'qcow2', image, '64M'])).code, 0);
    const mappedRun = await run(process.execPath, [launcher, 'info', '--output', 'json', image]);
    const readRun = await run(process.execPath, [launcher, 'info', '--output', 'json', image], { env: { ...process.env, QCOW_NO_NATIVE: '1' } });
    assert.equal(mappedRun.code, 0, mappedRun.stderr);
    assert.equal(readRun.code, 0, readRun.stderr);
    assert.equal(readRun.stdout, mappedRun.stdout);
    assert.equal(JSON.parse(mappedRun.stdout).format, 'qcow2');
  } finally {
    await rm(dirTmp, { recursive: true, force: true });
  }
});

/** The launcher as `node bin/qcow.cjs ARGS` runs it: its output and the modules Node loaded. */
async function modulesLoadedBy(args: string[]): Promise<{ stdout: string; loaded: string[] }> {
  const probe = [
    `process.argv.splice(1, 0, ${JSON.stringify(launcher)});`,
    "process.on('exit', () => require('node:fs').writeSync(2, JSON.stringify(process.moduleLoadList)));",
    `require('node:module').runMain(${JSON.stringify(launcher)});`,
  ].join('\n');
  // Without the flag bin/qcow passes, the code caches would still be taken; with it, as users run.
  // `--`: arguments such as qemu-io's `-c` are the command's, not node's.
  const r = await run(process.execPath, ['--no-concurrent-recompilation', '-e', probe, '--', ...args]);
  assert.equal(r.code, 0, r.stderr);
  return { stdout: r.stdout, loaded: JSON.parse(r.stderr) as string[] };
}

test('a command with little work loads none of the Node modules the bundles make lazy (os, child_process)', async () => {
  const dirTmp = await mkdtemp(join(tmpdir(), 'qcow-lazy-'));
  try {
    const image = join(dirTmp, 'a.qcow2');
    assert.equal((await run(process.execPath, [launcher, 'create', '-q', '-f', 'qcow2', image, '64M'])).code, 0);
    const { stdout, loaded } = await modulesLoadedBy(['info', image]);
    assert.match(stdout, /^image: /);
    // Without the host addon the launcher asks node:os for the core count (to size libuv's pool).
    const lazy = hostAddon() ? ['NativeModule os', 'NativeModule child_process'] : ['NativeModule child_process'];
    for (const name of lazy) assert.ok(!loaded.includes(name), `${name} was loaded`);
  } finally {
    await rm(dirTmp, { recursive: true, force: true });
  }
});

test('plain converts and qemu-io reads load no Node module only another path needs (tty, fs/promises, readline, net, perf_hooks)', async () => {
  // Each of these once crept in through a top-level import (node:tty for the check that standard
  // output is no terminal, used only by `convert ... -`; node:fs/promises for one stat in
  // qemu-io's protocol check) and cost every start ~200 page faults.
  const dirTmp = await mkdtemp(join(tmpdir(), 'qcow-lazy-'));
  try {
    const image = join(dirTmp, 'a.qcow2');
    assert.equal((await run(process.execPath, [launcher, 'create', '-q', '-f', 'qcow2', image, '4M'])).code, 0);
    // node:perf_hooks came with qemu-io's clock (the global \`performance\`, ~50 page faults and more).
    const unwanted = ['NativeModule tty', 'NativeModule fs/promises', 'NativeModule readline', 'NativeModule net', 'NativeModule perf_hooks'];
    const runs = [
      ['convert', '-O', 'raw', image, join(dirTmp, 'out.raw')],
      ['--persona=qemu-io', '-c', 'read 0 64k', image],
    ];
    for (const args of runs) {
      const { loaded } = await modulesLoadedBy(args);
      for (const name of unwanted) assert.ok(!loaded.includes(name), `${args[0]}: ${name} was loaded`);
    }
  } finally {
    await rm(dirTmp, { recursive: true, force: true });
  }
});

test('reading an unencrypted image loads neither node:crypto nor node:net, also behind the qemu-img persona', async () => {
  // node:crypto came in with the LUKS format every opener probes for, node:net with the NBD
  // client the qemu-img persona imported for its file-name check: ~190 and ~110 page faults of
  // every start. Only encrypted images and NBD exports need them.
  const dirTmp = await mkdtemp(join(tmpdir(), 'qcow-lazy-'));
  try {
    const image = join(dirTmp, 'a.qcow2');
    assert.equal((await run(process.execPath, [launcher, 'create', '-q', '-f', 'qcow2', image, '4M'])).code, 0);
    const unwanted = ['NativeModule crypto', 'NativeModule net', 'NativeModule stream'];
    const runs = [['info', image], ['check', image], ['map', image], ['--persona=qemu-img', 'info', image], ['compare', image, image], ['convert', '-O', 'raw', image, join(dirTmp, 'out.raw')]];
    for (const args of runs) {
      const { loaded } = await modulesLoadedBy(args);
      for (const name of unwanted) assert.ok(!loaded.includes(name), `${args.join(' ')}: ${name} was loaded`);
    }
  } finally {
    await rm(dirTmp, { recursive: true, force: true });
  }
});

/**
 * The library's modules (dist/, unbundled) that opening `image` with node-open.ts's openImage
 * (as the CLI opens images) and reading its description loaded, by path under dist/, as a module
 * loader hook saw them. The bundles set up a module exactly where this graph first loads it: the
 * lazy edges are the import() calls, in the library as in the bundle.
 */
async function modulesOpeningLoads(work: string, image: string, readOnly: boolean): Promise<string[]> {
  const list = join(work, `loaded-${Math.random().toString(36).slice(2)}.txt`);
  const hooks = join(work, 'hooks.mjs');
  const register = join(work, 'register.mjs');
  writeFileSync(hooks, "import { appendFileSync } from 'node:fs';\nexport async function load(url, context, next) {\n  appendFileSync(process.env.QCOW_TEST_LOADED, url + '\\n');\n  return next(url, context);\n}\n");
  writeFileSync(register, `import { register } from 'node:module';\nregister(${JSON.stringify(pathToFileURL(hooks).href)});\n`);
  writeFileSync(list, '');
  const dist = pathToFileURL(join(dir, '..')).href + '/';
  const script = [
    `const { openImage } = await import(${JSON.stringify(`${dist}node-open.js`)});`,
    `const dev = await openImage(${JSON.stringify(image)}, { readOnly: ${readOnly} });`,
    'await dev.describe();',
    'await dev.close();',
  ].join('\n');
  const r = await run(process.execPath, ['--import', pathToFileURL(register).href, '--input-type=module', '-e', script], { env: { ...process.env, QCOW_TEST_LOADED: list } });
  assert.equal(r.code, 0, r.stderr);
  return readFileSync(list, 'utf8').split('\n').filter((u) => u.startsWith(dist)).map((u) => u.slice(dist.length));
}

test('opening a qcow2 image read-only loads neither qcow v1, LUKS nor the qcow2 writer; the images that need them do', async () => {
  // Every image is probed against every format: qcow v1's device, LUKS's device and crypto, and
  // the qcow2 writer (the allocator, bitmaps) were set up by every command (~60 page faults, and
  // ~28 KB of each code cache), for images of those formats, or opened for writing, only.
  const work = await mkdtemp(join(tmpdir(), 'qcow-formats-'));
  try {
    const image = join(work, 'a.qcow2');
    const v1 = join(work, 'a.qcow');
    assert.equal((await run(process.execPath, [launcher, 'create', '-q', '-f', 'qcow2', image, '4M'])).code, 0);
    assert.equal((await run(process.execPath, [launcher, 'create', '-q', '-f', 'qcow', v1, '4M'])).code, 0);
    const loaded = await modulesOpeningLoads(work, image, true);
    assert.ok(loaded.includes('formats/qcow2/qcow2.js'), 'the hook saw the qcow2 device load');
    for (const m of ['formats/qcow1/device.js', 'formats/luks/luks.js', 'crypto/luks.js', 'formats/qcow2/write.js', 'formats/qcow2/alloc.js', 'formats/qcow2/bitmaps/persistent.js']) {
      assert.ok(!loaded.includes(m), `${m} was loaded`);
    }
    assert.ok((await modulesOpeningLoads(work, v1, true)).includes('formats/qcow1/device.js'));
    const writable = await modulesOpeningLoads(work, image, false);
    assert.ok(writable.includes('formats/qcow2/write.js') && !writable.includes('formats/qcow1/device.js'));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
});

test('the host addon is loaded once: the launcher hands the one it loaded to the library', { skip: !hostAddon() && 'no host addon' }, async () => {
  const dirTmp = await mkdtemp(join(tmpdir(), 'qcow-addon-once-'));
  try {
    const image = join(dirTmp, 'a.qcow2');
    assert.equal((await run(process.execPath, [launcher, 'create', '-q', '-f', 'qcow2', image, '64M'])).code, 0);
    const probe = [
      `process.argv.splice(1, 0, ${JSON.stringify(launcher)});`,
      'let loads = 0;',
      'const dlopen = process.dlopen;',
      'process.dlopen = function (...args) { if (String(args[1]).endsWith("qcow_host.node")) loads++; return dlopen.apply(this, args); };',
      "process.on('exit', () => require('node:fs').writeSync(2, String(loads)));",
      `require('node:module').runMain(${JSON.stringify(launcher)});`,
    ].join('\n');
    // info takes QEMU's image locks through the addon: the library uses it.
    const r = await run(process.execPath, ['--no-concurrent-recompilation', '-e', probe, 'info', image]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^image: /);
    assert.equal(r.stderr, '1');
  } finally {
    await rm(dirTmp, { recursive: true, force: true });
  }
});

test('a compressed image loads the Node module of its own codec only (node:zlib without the host addon\'s zlib, node:v8 for WebAssembly zstd)', async () => {
  const dirTmp = await mkdtemp(join(tmpdir(), 'qcow-lazy-codec-'));
  try {
    const p = (f: string) => join(dirTmp, f);
    const text = Buffer.alloc(1 << 20);
    for (let i = 0; i < text.length; i += 64) text.write(`line ${i} of text that compresses well, and more of it\n`.padEnd(64, '.'), i);
    writeFileSync(p('a.raw'), text);
    for (const type of ['zlib', 'zstd']) {
      const made = await run(process.execPath, [launcher, 'convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, p('a.raw'), p(`${type}.qcow2`)]);
      assert.equal(made.code, 0, made.stderr);
    }
    // node:zlib brings node:stream (~5 ms) and node:v8 its heap utilities (~4 ms). (node:module,
    // loaded only to start codec workers, cannot be checked here: the probe itself loads it.)
    const zlib = await modulesLoadedBy(['convert', '-O', 'raw', p('zlib.qcow2'), p('zlib.raw')]);
    // Where the host addon calls node:zlib's zlib directly, node:zlib itself is not needed either.
    if (nativeZlibOf(hostAddon())) assert.ok(!zlib.loaded.includes('NativeModule zlib'), 'node:zlib was loaded for a zlib image inflated by the addon');
    else assert.ok(zlib.loaded.includes('NativeModule zlib'), 'node:zlib was not loaded for a zlib image');
    assert.ok(!zlib.loaded.includes('NativeModule v8'), 'node:v8 was loaded for a zlib image');
    const zstd = await modulesLoadedBy(['convert', '-O', 'raw', p('zstd.qcow2'), p('zstd.raw')]);
    // node:v8 sets the WebAssembly decoder's tiering budget: where the host addon decodes zstd
    // through libzstd, no WebAssembly is compiled and node:v8 is not needed either.
    if (nativeZstdOf(hostAddon())) assert.ok(!zstd.loaded.includes('NativeModule v8'), 'node:v8 was loaded for a zstd image decoded by libzstd');
    else assert.ok(zstd.loaded.includes('NativeModule v8'), 'node:v8 was not loaded for a zstd image (wasm tiering budget)');
    assert.ok(!zstd.loaded.includes('NativeModule zlib'), 'node:zlib was loaded for a zstd image');
    assert.deepEqual(readFileSync(p('zlib.raw')), text);
    assert.deepEqual(readFileSync(p('zstd.raw')), text);
  } finally {
    await rm(dirTmp, { recursive: true, force: true });
  }
});

test('bin/qcow runs Node with its malloc tunables unless the user set their own, and keeps them from child processes', { skip: process.platform !== 'linux' && 'reads /proc' }, async (t) => {
  const dirTmp = await mkdtemp(join(tmpdir(), 'qcow-tunables-'));
  t.after(() => rm(dirTmp, { recursive: true, force: true }));
  const image = join(dirTmp, 'a.qcow2');
  assert.equal((await run(process.execPath, [launcher, 'create', '-q', '-f', 'qcow2', image, '1M'])).code, 0);
  // `qcow serve` stays up: its environment as the kernel started it, and as Node sees it.
  const environOf = async (env: NodeJS.ProcessEnv): Promise<string[]> => {
    const sock = join(dirTmp, `s-${Math.random().toString(36).slice(2)}.sock`);
    const child = spawn(QCOW_BIN, ['serve', '-k', sock, '--pid-file', `${sock}.pid`, '-r', image], { env, stdio: 'ignore' });
    try {
      for (let i = 0; i < 400 && !existsSync(`${sock}.pid`); i++) await new Promise((r) => setTimeout(r, 25));
      const pid = Number(readFileSync(`${sock}.pid`, 'utf8'));
      return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0');
    } finally {
      child.kill('SIGKILL');
    }
  };
  const base = { ...process.env };
  delete base.GLIBC_TUNABLES;
  const ours = await environOf(base);
  assert.ok(ours.some((v) => v.startsWith('GLIBC_TUNABLES=glibc.malloc.trim_threshold=')), 'set for the Node process');
  const users = await environOf({ ...base, GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' });
  assert.ok(users.includes('GLIBC_TUNABLES=glibc.malloc.arena_max=2'), "the user's own are left as they are");
  assert.ok(!users.some((v) => v.startsWith('QCOW_OWN_GLIBC_TUNABLES=')));
  // Node's own view (what child processes inherit): without ours.
  const probe = "process.on('exit', () => require('node:fs').writeSync(2, JSON.stringify([process.env.GLIBC_TUNABLES ?? null, process.env.QCOW_OWN_GLIBC_TUNABLES ?? null])))";
  const r = await run(process.execPath, ['-e', `${probe}; process.argv.splice(1, 0, ${JSON.stringify(launcher)}); require('node:module').runMain(${JSON.stringify(launcher)});`, 'info', image], {
    env: { ...base, GLIBC_TUNABLES: 'glibc.malloc.trim_threshold=1', QCOW_OWN_GLIBC_TUNABLES: '1' },
  });
  assert.deepEqual(JSON.parse(r.stderr.trim().split('\n').pop()!), [null, null]);
});

test('compat/qemu-img and compat/qemu-io run bin/qcow in their own shell: one sh, then Node, also through a symlink on PATH', async (t) => {
  // A second `sh` (exec of bin/qcow) cost each compat command ~64 page faults.
  const root = join(dir, '..', '..');
  const links = await mkdtemp(join(tmpdir(), 'qcow-compat-'));
  t.after(() => rm(links, { recursive: true, force: true }));
  for (const [name, persona, version] of [
    ['qemu-img', '--persona=qemu-img', /^qemu-img version /],
    ['qemu-io', '--persona=qemu-io', /^qemu-io version /],
  ] as const) {
    const launcherPath = join(root, 'compat', name);
    symlinkSync(launcherPath, join(links, name));
    // `sh -x` traces this shell only: bin/qcow's lines are in it when it runs here, and Node is
    // what it starts.
    for (const path of [launcherPath, join(links, name)]) {
      const r = await run('sh', ['-x', path, '--version']);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, version);
      const execs = r.stderr.split('\n').filter((l) => /^\++ exec /.test(l));
      assert.equal(execs.length, 1, r.stderr);
      assert.match(execs[0]!, new RegExp(`^\\++ exec node --no-concurrent-recompilation \\S*bin/qcow\\.cjs ${persona} --version$`));
    }
    // Found by name on PATH, as users and test suites run it.
    const r = await run(name, ['--version'], { env: { ...process.env, PATH: `${links}:${process.env.PATH}` } });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, version);
  }
  // A qcow_bin_dir in the environment that names no launcher does not mislead bin/qcow.
  const own = await run(QCOW_BIN, ['--version'], { env: { ...process.env, qcow_bin_dir: '/nonexistent' } });
  assert.equal(own.code, 0, own.stderr);
});
