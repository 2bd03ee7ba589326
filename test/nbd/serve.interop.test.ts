/**
 * `qcow serve` against the real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io, and qemu-nbd
 * as the reference server. Servers listen on Unix sockets in scratch folders and are stopped in
 * t.after. Formats we can only read yet are exported read-only; writes are tested wherever our
 * driver can write.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { connect, createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { isQcowError } from '#src/core/errors.js';
import { openImage } from '#src/node.js';
import { CLI, needs, qcowOk, qemuGuestSha256, qemuImg, qemuIo, randomBytes, run, runOk, scratch, sha256 } from '../support/qemu.js';
import { NbdClient } from '../support/nbd-client.js';
import { serveQcow, type Served } from '../support/serve.js';
import * as C from '#src/nbd/constants.js';
import { Writer } from '#src/nbd/wire.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `qcow serve ARGS`, exporting under `name` (the default export when empty). */
const serve = (t: TestContext, dir: string, args: string[], name = ''): Promise<Served> => serveQcow(t, dir, args, { name });

/** Start qemu-nbd read-only on the same kind of socket, for reference answers. */
async function qemuNbd(t: TestContext, dir: string, format: string, file: string, extra: string[] = []): Promise<string> {
  const sock = join(dir, `qemu-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  const child = spawn('qemu-nbd', ['-t', '-r', '-f', format, '-k', sock, '--pid-file', pidFile, ...extra, file], { stdio: 'ignore' });
  t.after(() => void child.kill('SIGTERM'));
  for (let i = 0; i < 400 && !(await stat(pidFile).catch(() => undefined)); i++) await sleep(25);
  return `nbd+unix:///?socket=${sock}`;
}

/** nbdinfo --map (of base:allocation, or of `context`) as [start, length, flags] with equal neighbours merged. */
async function nbdMap(uri: string, context?: string): Promise<number[][]> {
  const { stdout } = await runOk('nbdinfo', [context ? `--map=${context}` : '--map', uri]);
  const rows = stdout
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
  return mergeRows(rows);
}

function mergeRows(rows: number[][]): number[][] {
  const out: number[][] = [];
  for (const [start, length, flags] of rows) {
    const last = out.at(-1);
    if (last && last[2] === flags && last[0]! + last[1]! === start) last[1]! += length!;
    else out.push([start!, length!, flags!]);
  }
  return out;
}

/** What `qcow map` says, in base:allocation terms: HOLE when not data, ZERO when zero. */
async function qcowMapAsNbd(file: string, format: string): Promise<number[][]> {
  const { stdout } = await qcowOk(['map', '-f', format, '--output=json', file]);
  const extents = JSON.parse(stdout) as { start: number; length: number; zero: boolean; data: boolean }[];
  return mergeRows(extents.map((e) => [e.start, e.length, (e.data ? 0 : C.NBD_STATE_HOLE) | (e.zero ? C.NBD_STATE_ZERO : 0)]));
}

/** Whether our driver can write this format yet (formats land one by one). */
async function canWrite(dir: string, format: string): Promise<boolean> {
  const probe = join(dir, `probe.${format}`);
  await qemuImg(['create', '-q', '-f', format, probe, '1M']);
  const dev = await openImage(probe, { format });
  try {
    await dev.write(0, new Uint8Array(512).fill(1));
    return true;
  } catch (e) {
    if (isQcowError(e) && e.code === 'QCOW_UNSUPPORTED') return false;
    throw e;
  } finally {
    await dev.close();
  }
}

/** A 4 MiB raw image with a pattern, zeros, and random data, converted to `format`. */
async function makeImage(dir: string, format: string): Promise<string> {
  const raw = join(dir, 'src.raw');
  await qemuImg(['create', '-q', '-f', 'raw', raw, '4M']);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0xab 0 1M', '-c', 'write -P 0xcd 2M 64k', raw]);
  const fh = await readFile(raw);
  fh.set(randomBytes(1 << 20, 42), 3 << 20);
  await writeFile(raw, fh);
  if (format === 'raw') return raw;
  const file = join(dir, `img.${format}`);
  await qemuImg(['convert', '-f', 'raw', '-O', format, raw, file]);
  return file;
}

async function nbdcopySha(uri: string): Promise<string> {
  const { stdout } = await run('sh', ['-c', `nbdcopy -- '${uri}' - | sha256sum`]);
  return stdout.split(' ')[0]!;
}

for (const format of ['raw', 'qcow', 'qcow2']) {
  test(`${format}: nbdinfo, nbdcopy, qemu-img convert and compare see the image's content and allocation`, needs('nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-nbd'), async (t) => {
    const dir = await scratch(t);
    const file = await makeImage(dir, format);
    const expected = await qemuGuestSha256(['-f', format, file]);
    const s = await serve(t, dir, ['-t', '-e', '4', '-r', '-f', format, '-D', 'test export', file], 'disk0');

    const info = JSON.parse((await runOk('nbdinfo', ['--json', s.uri])).stdout) as { exports: { 'export-name': string; 'export-size': number; description?: string; is_read_only: boolean }[] };
    assert.equal(info.exports[0]!['export-name'], 'disk0');
    assert.equal(info.exports[0]!['export-size'], 4 << 20);
    assert.equal(info.exports[0]!.description, 'test export');
    assert.equal(info.exports[0]!.is_read_only, true);

    assert.deepEqual(await nbdMap(s.uri), await qcowMapAsNbd(file, format));
    if (format !== 'raw') {
      // qemu-nbd on the same image reports the same HOLE/ZERO bits. (Not for raw: qemu sees a
      // sparse file's holes through the filesystem; our raw driver reports all of it as data.)
      assert.deepEqual(await nbdMap(s.uri), await nbdMap(await qemuNbd(t, dir, format, file)));
    }

    // Several clients at once.
    const shas = await Promise.all([nbdcopySha(s.uri), nbdcopySha(s.uri), qemuGuestSha256(['-f', 'raw', s.uri])]);
    assert.deepEqual(shas, [expected, expected, expected]);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', format, s.uri, file]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  });

  test(`${format}: qemu-io writes patterns over NBD; after SIGTERM the image holds them`, needs('qemu-io', 'qemu-img'), async (t) => {
    const dir = await scratch(t);
    if (!(await canWrite(dir, format))) return t.skip(`our ${format} driver cannot write yet`);
    const file = await makeImage(dir, format);
    const s = await serve(t, dir, ['-t', '-f', format, file]);
    const io = (...cmds: string[]) => runOk('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), s.uri]);
    await io('write -P 0x5a 1536 70000', 'write -z 2M 64k', 'write -f -P 0x77 3M 4k', 'discard 1M 64k', 'flush');
    await io('read -P 0x5a 1536 70000', 'read -P 0 2M 64k', 'read -P 0x77 3M 4k', 'read -P 0xab 0 1536');
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', format, s.uri, file]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    const before = await qemuGuestSha256(['-f', 'raw', s.uri]);

    s.child.kill('SIGTERM');
    assert.equal(await s.exited, 0, s.stderr());
    assert.equal(await stat(s.sock).catch(() => 'gone'), 'gone');
    assert.equal(await qemuGuestSha256(['-f', format, file]), before);
    await qemuIo(['-r', '-f', format, '-c', 'read -P 0x5a 1536 70000', '-c', 'read -P 0 2M 64k', file]);
    if (format === 'qcow2') await qemuImg(['check', file]);
  });
}

test('qcow2 chain: read through the backing file over NBD, same map as qemu-nbd', needs('nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const base = await makeImage(dir, 'qcow2');
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '6M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0xa1 1M 128k', '-c', 'write -z 3M 64k', '-c', 'write -P 0xa2 5M 4k', top]);
  const s = await serve(t, dir, ['-t', '-r', '-f', 'qcow2', top]);
  assert.equal(await nbdcopySha(s.uri), await qemuGuestSha256(['-f', 'qcow2', top]));
  assert.deepEqual(await nbdMap(s.uri), await qcowMapAsNbd(top, 'qcow2'));
  assert.deepEqual(await nbdMap(s.uri), await nbdMap(await qemuNbd(t, dir, 'qcow2', top)));
});

test('serve -A: qemu:allocation-depth over a chain of three equals qemu-nbd -A, beside base:allocation', needs('nbdinfo', 'qemu-img', 'qemu-io', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const base = await makeImage(dir, 'qcow2');
  const mid = join(dir, 'mid.qcow2');
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', mid, '6M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0xb1 512k 256k', '-c', 'write -z 2M 32k', mid]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', top]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0xa1 1M 128k', '-c', 'write -z 3M 64k', '-c', 'write -P 0xa2 5M 4k', top]);
  const s = await serve(t, dir, ['-t', '-r', '-A', '-f', 'qcow2', top]);
  const q = await qemuNbd(t, dir, 'qcow2', top, ['-A']);
  const depth = await nbdMap(s.uri, 'qemu:allocation-depth');
  assert.deepEqual(depth, await nbdMap(q, 'qemu:allocation-depth'));
  // Every depth shows up: unallocated (0), top (1), mid (2), base (3).
  assert.deepEqual([...new Set(depth.map((r) => r[2]))].sort(), [0, 1, 2, 3]);
  assert.deepEqual(await nbdMap(s.uri), await nbdMap(q));
  const contexts = async (uri: string) => (JSON.parse((await runOk('nbdinfo', ['--json', uri])).stdout) as { exports: { contexts: string[] }[] }).exports[0]!.contexts.sort();
  assert.deepEqual(await contexts(s.uri), await contexts(q));
  // Without -A only base:allocation is offered.
  const plain = await serve(t, dir, ['-t', '-r', '-f', 'qcow2', top]);
  assert.deepEqual(await contexts(plain.uri), ['base:allocation']);
});

test('a read-only export: qemu-io sees it read-only, a write gets EPERM, reads go on', needs('qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = await makeImage(dir, 'raw');
  const s = await serve(t, dir, ['-t', '-r', '-f', 'raw', file]);
  const rw = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', s.uri]);
  assert.match(rw.stderr, /Permission denied/); // qemu refuses a read-write open of a READ_ONLY export
  const c = await NbdClient.connect({ path: s.sock }, { structuredReplies: true });
  const w = await c.request(C.NBD_CMD_WRITE, 0, 0, 512, new Uint8Array(512));
  assert.equal(w.error, C.NBD_EPERM);
  await c.disconnect();
  await runOk('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0xab 0 512', s.uri]);
});

test('garbage and vanishing clients do not disturb a real client', needs('nbdcopy', 'qemu-img'), async (t) => {
  const dir = await scratch(t);
  const file = await makeImage(dir, 'raw');
  const expected = await qemuGuestSha256(['-f', 'raw', file]);
  const s = await serve(t, dir, ['-t', '-e', '4', '-f', 'raw', file]);
  const address = { path: s.sock };

  // Junk instead of a handshake.
  const junk = connect(s.sock);
  junk.on('error', () => undefined);
  junk.on('data', () => junk.write(new Uint8Array(4096).fill(0xfe)));
  await new Promise((r) => junk.once('close', r));
  // A bad request magic in transmission.
  const bad = await NbdClient.connect(address);
  const badClosed = new Promise((r) => bad.socket.once('close', r));
  bad.socket.write(new Uint8Array(28).fill(0x42));
  await badClosed;
  // A write cut off in the middle of its payload.
  const cut = await NbdClient.connect(address);
  cut.socket.write(new Writer(28).u32(C.NBD_REQUEST_MAGIC).u16(0).u16(C.NBD_CMD_WRITE).u64(1).u64(0).u32(1 << 20).bytes);
  cut.socket.write(new Uint8Array(4096));
  cut.destroy();
  // A client with requests in flight that disappears.
  const gone = await NbdClient.connect(address);
  const reads = Array.from({ length: 8 }, (_, i) => gone.read(i << 19, 1 << 19).catch(() => undefined));
  gone.destroy();
  await Promise.all(reads);

  assert.equal(await nbdcopySha(s.uri), expected);
  assert.equal(sha256(await readFile(file)), expected);
  assert.equal(s.child.exitCode, null, 'server still running');
});

test('without -t the server exits 0 after its client leaves; a port in use is one clean error line', needs('nbdinfo'), async (t) => {
  const dir = await scratch(t);
  const file = await makeImage(dir, 'raw');
  const s = await serve(t, dir, ['-f', 'raw', file]);
  await runOk('nbdinfo', ['--size', s.uri]);
  assert.equal(await s.exited, 0, s.stderr());

  const blocker = await new Promise<Server>((resolve) => {
    const srv = createServer().listen(0, '127.0.0.1', () => resolve(srv));
  });
  t.after(() => void blocker.close());
  const port = (blocker.address() as { port: number }).port;
  const r = await run(process.execPath, [CLI, 'serve', '-p', String(port), '-f', 'raw', file], { timeoutMs: 20_000 });
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^qcow: cannot listen on 127\.0\.0\.1:\d+: EADDRINUSE\n$/);
});
