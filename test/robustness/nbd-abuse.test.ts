/**
 * `qcow serve` under load, abuse and sudden death. Servers listen on Unix sockets in scratch
 * folders; every process started here is killed in t.after; every loop is bounded.
 *  - killed with SIGKILL while clients write through it: qemu-img check finds no corruption (leaks
 *    are allowed) and what a completed NBD flush covered reads back, through QEMU and through us;
 *  - sixteen readers at once (-e 16), some killed mid-transfer: every finished reader saw the image;
 *  - malformed handshakes and requests, and a flood of requests from a client that never reads its
 *    replies: the server drops or answers the offender, stays up, serves the others, and its memory
 *    stays bounded; the image is unchanged.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { needs, qemuGuestSha256, qemuImg, randomBytes, run, scratch, sha256 } from '../support/qemu.js';
import { readGuest } from '../support/crash.js';
import { NbdClient } from '../support/nbd-client.js';
import { serveQcow, type Served } from '../support/serve.js';
import * as C from '#src/nbd/constants.js';
import { Writer } from '#src/nbd/wire.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const HANG_GUARD_MS = 60_000;

/** `qcow serve ARGS`, killed outright in t.after (these tests leave servers in any state). */
const serve = (t: TestContext, dir: string, args: string[]): Promise<Served> => serveQcow(t, dir, args, { stop: 'kill' });

/** Spawn a process that t.after kills; resolves with its exit code or signal. */
function spawnTracked(t: TestContext, cmd: string, args: string[]): { child: ChildProcess; done: Promise<{ code: number | string; out: string }> } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  const guard = setTimeout(() => child.kill('SIGKILL'), HANG_GUARD_MS);
  t.after(() => void child.kill('SIGKILL'));
  const done = new Promise<{ code: number | string; out: string }>((resolve) =>
    child.once('close', (code, signal) => {
      clearTimeout(guard);
      resolve({ code: code ?? signal ?? -1, out });
    }),
  );
  return { child, done };
}

/** The peak resident memory of a running process in KiB (Linux), or undefined elsewhere. */
async function peakRssKiB(pid: number): Promise<number | undefined> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => undefined);
  const m = status && /VmHWM:\s+(\d+) kB/.exec(status);
  return m ? Number(m[1]) : undefined;
}

async function qemuCheckCorruptions(file: string): Promise<number> {
  const r = await run('qemu-img', ['check', '--output=json', file]);
  assert.ok(r.code === 0 || r.code === 3, `qemu-img check exit ${r.code}\n${r.stdout}${r.stderr}`);
  return (JSON.parse(r.stdout) as { corruptions?: number }).corruptions ?? 0;
}

const ROUNDS = Number(process.env.QCOW_CRASH_ROUNDS ?? 3);

test(`qcow serve SIGKILLed while two clients write: no corruption, flushed data survives (${ROUNDS} rounds)`, needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'served.qcow2');
  const SIZE = 16 * 2 ** 20;
  const HALF = SIZE / 2;
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', file, String(SIZE)]);
  let model: Uint8Array = new Uint8Array(SIZE);
  let x = 777;
  const rand = (n: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
  let flushed = 0;
  for (let round = 0; round < ROUNDS; round++) {
    const s = await serve(t, dir, ['-t', '-e', '2', '-f', 'qcow2', file]);
    // qemu-io fills the upper half with two patterns over and over (it dies with the server).
    const cmds: string[] = [];
    for (let i = 0; i < 64; i++) cmds.push('-c', `write -P ${i % 2 ? '0x44' : '0x33'} ${HALF + (i % 8) * 2 ** 20} 1M`, '-c', 'flush');
    const io = spawnTracked(t, 'qemu-io', ['-f', 'raw', ...cmds, s.uri]);
    // We write random data into the lower half, flushing now and then; a flush reply makes every
    // write before it durable.
    const client = await NbdClient.connect({ path: s.sock });
    const pending: [number, Uint8Array][] = [];
    const killAt = Date.now() + 300 + rand(700);
    const writer = (async () => {
      for (let i = 0; i < 100_000 && Date.now() < killAt + 5000; i++) {
        const len = rand(3) === 0 ? 1 + rand(4096) : 512 * (1 + rand(128));
        const off = rand(HALF - len);
        const data = randomBytes(len, round * 1_000_003 + i + 1);
        pending.push([off, data]);
        await client.write(off, data);
        if (rand(6) === 0) {
          await client.flush();
          for (const [o, d] of pending.splice(0)) model.set(d, o);
          flushed++;
        }
      }
    })().catch(() => undefined);
    while (Date.now() < killAt && s.child.exitCode === null) await sleep(20);
    s.child.kill('SIGKILL');
    assert.equal(await s.exited, 'SIGKILL');
    await writer;
    client.destroy();
    await io.done;

    assert.equal(await qemuCheckCorruptions(file), 0, `round ${round}: qemu-img check found corruption`);
    const maybe = new Uint8Array(SIZE);
    for (const [o, d] of pending) maybe.fill(1, o, o + d.length);
    const ours = await readGuest(file, 'qcow2');
    const out = join(dir, 'qemu.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, out]);
    const theirs = new Uint8Array(await readFile(out));
    assert.ok(Buffer.from(ours).equals(Buffer.from(theirs)), `round ${round}: our reader and qemu's disagree`);
    for (let i = 0; i < HALF; i++) {
      if (!maybe[i] && ours[i] !== model[i]) assert.fail(`round ${round}: byte ${i} is ${ours[i]}, expected ${model[i]}`);
    }
    // The upper half holds only what qemu-io wrote there (or zeros): nothing landed elsewhere.
    for (let i = HALF; i < SIZE; i++) {
      const b = ours[i];
      if (b !== 0 && b !== 0x33 && b !== 0x44) assert.fail(`round ${round}: byte ${i} in qemu-io's half is ${b}`);
    }
    model = ours;
  }
  assert.ok(flushed > 0, 'some flushes completed before the kills');
  t.diagnostic(`${flushed} flushes completed over ${ROUNDS} rounds`);
});

/** A 4 MiB qcow2 image of random data and zeros; returns its path and guest SHA-256. */
async function makeImage(dir: string): Promise<{ file: string; sha: string }> {
  const raw = join(dir, 'src.raw');
  const bytes = new Uint8Array(4 << 20);
  bytes.set(randomBytes(1 << 20, 5), 0);
  bytes.set(randomBytes(1 << 20, 6), 3 << 20);
  await writeFile(raw, bytes);
  const file = join(dir, 'img.qcow2');
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, file]);
  return { file, sha: sha256(bytes) };
}

test('sixteen readers at once with -e 16, two more killed mid-transfer: every reader sees the image', needs('qemu-img', 'nbdcopy'), async (t) => {
  const dir = await scratch(t);
  const { file, sha } = await makeImage(dir);
  const before = sha256(await readFile(file));
  const s = await serve(t, dir, ['-t', '-r', '-e', '16', '-f', 'qcow2', file]);
  const victims = [0, 1].map(() => spawnTracked(t, 'sh', ['-c', `exec nbdcopy -C 1 -- '${s.uri}' null:`]));
  const readers = Array.from({ length: 16 }, (_, i) =>
    i % 2 === 0
      ? spawnTracked(t, 'sh', ['-c', `nbdcopy -C 1 -- '${s.uri}' - | sha256sum`]).done.then((r) => r.out.split(' ')[0])
      : qemuGuestSha256(['-f', 'raw', s.uri]),
  );
  await sleep(30);
  for (const v of victims) v.child.kill('SIGKILL');
  const shas = await Promise.all(readers);
  assert.deepEqual(shas, Array(16).fill(sha));
  assert.equal(s.child.exitCode, null, 'the server is still up');
  assert.equal(await qemuGuestSha256(['-f', 'raw', s.uri]), sha, 'and still serves');
  assert.equal(sha256(await readFile(file)), before);
});

/** A raw socket to the server, with the bytes it received and a promise for its close. */
function rawSocket(path: string): { sock: Socket; received: () => Buffer; closed: Promise<void> } {
  const sock = connect(path);
  const chunks: Buffer[] = [];
  sock.on('data', (d: Buffer) => chunks.push(d));
  sock.on('error', () => undefined);
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  return { sock, received: () => Buffer.concat(chunks), closed };
}

/** Resolve when `p` settles or after the hang guard (then fail). */
async function within<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`hang: ${what}`)), HANG_GUARD_MS)));
  try {
    return await Promise.race([p, guard]);
  } finally {
    clearTimeout(timer);
  }
}

const optionHeader = (option: number, length: number) => new Writer(16).u64(C.NBD_OPTS_MAGIC).u32(option).u32(length).bytes;
const request = (type: number, flags: number, cookie: bigint, offset: bigint, length: number) =>
  new Writer(28).u32(C.NBD_REQUEST_MAGIC).u16(flags).u16(type).u64(cookie).u64(offset).u32(length).bytes;

test('malformed handshakes and requests: the offender is answered or dropped, the server serves the rest', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const { file, sha } = await makeImage(dir);
  const before = sha256(await readFile(file));
  const s = await serve(t, dir, ['-t', '-e', '4', '-f', 'qcow2', file]);
  const clientFlags = new Writer(4).u32(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES).bytes;

  // Handshake abuse: an option claiming 4 GiB of data, a wrong option magic, unknown client flags,
  // an option cut off halfway, and a client that sends nothing and leaves.
  const abuses: Uint8Array[][] = [
    [clientFlags, optionHeader(C.NBD_OPT_GO, 0xffffffff)],
    [clientFlags, new Uint8Array(16).fill(0x41)],
    [new Writer(4).u32(0xfffffff0).bytes, optionHeader(C.NBD_OPT_GO, 0)],
    [clientFlags, optionHeader(C.NBD_OPT_GO, 1000).subarray(0, 10)],
    [clientFlags, optionHeader(C.NBD_OPT_LIST_META_CONTEXT, 8), new Uint8Array(8).fill(0xff)],
    [],
  ];
  for (const parts of abuses) {
    const r = rawSocket(s.sock);
    for (const p of parts) r.sock.write(p);
    // The server either answers with an error and waits for more, or closes; either way we leave.
    await sleep(50);
    r.sock.end();
    await within(r.closed, 'handshake abuse');
  }

  // Transmission abuse, each on its own connection: every request gets an error reply or the
  // connection is closed; none of them is carried out.
  const abusive: [string, Uint8Array[]][] = [
    ['read of 4 GiB - 1', [request(C.NBD_CMD_READ, 0, 1n, 0n, 0xffffffff)]],
    ['read at 2^63', [request(C.NBD_CMD_READ, 0, 2n, 1n << 63n, 4096)]],
    ['read past the end', [request(C.NBD_CMD_READ, 0, 3n, (4n << 20n) - 512n, 4096)]],
    ['write announcing 4 GiB, sending 64 KiB', [request(C.NBD_CMD_WRITE, 0, 4n, 0n, 0xffffffff), new Uint8Array(65536).fill(0xee)]],
    ['write past the end', [request(C.NBD_CMD_WRITE, 0, 5n, 4n << 20n, 512), new Uint8Array(512).fill(0xee)]],
    ['unknown command and flags', [request(99, 0xffff, 6n, 0n, 512)]],
    ['trim and write-zeroes past the end', [request(C.NBD_CMD_TRIM, 0, 7n, 0n, 0xffffffff), request(C.NBD_CMD_WRITE_ZEROES, 0, 8n, 1n << 62n, 512)]],
    ['block status without a context, length 0', [request(C.NBD_CMD_BLOCK_STATUS, 0, 9n, 0n, 0)]],
    ['a request cut off mid-header', [request(C.NBD_CMD_READ, 0, 10n, 0n, 512).subarray(0, 13)]],
    ['bad request magic', [new Uint8Array(28).fill(0x42)]],
  ];
  for (const [what, parts] of abusive) {
    const c = await NbdClient.connect({ path: s.sock });
    const closed = new Promise<void>((r) => c.socket.once('close', () => r()));
    const chunks: Buffer[] = [];
    c.socket.on('data', (d: Buffer) => chunks.push(d));
    for (const p of parts) c.socket.write(p);
    await sleep(100);
    c.socket.end();
    await within(closed, what);
    // A simple reply to a command we sent: magic, then a non-zero error.
    const got = Buffer.concat(chunks);
    for (let off = 0; off + 16 <= got.length; off += 16) {
      if (got.readUInt32BE(off) !== 0x67446698) break;
      assert.notEqual(got.readUInt32BE(off + 4), 0, `${what}: the request must fail`);
    }
  }

  // The server is still up, serves a real client, and nothing was written.
  assert.equal(s.child.exitCode, null, `server still running: ${s.stderr()}`);
  assert.equal(await qemuGuestSha256(['-f', 'raw', s.uri]), sha);
  assert.equal(sha256(await readFile(file)), before, 'the image is unchanged');
  assert.doesNotMatch(s.stderr(), /at .*\.js:\d+/, 'no stack trace');
});

test('a flood of requests from a client that never reads its replies: memory stays bounded, others are served', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const { file, sha } = await makeImage(dir);
  const s = await serve(t, dir, ['-t', '-r', '-e', '4', '-f', 'qcow2', file]);
  // 8192 reads of 128 KiB = 1 GiB of replies nobody reads, from two clients.
  const flooders: NbdClient[] = [];
  for (let k = 0; k < 2; k++) {
    const c = await NbdClient.connect({ path: s.sock });
    c.socket.pause();
    const batch = new Uint8Array(28 * 512);
    for (let i = 0; i < 8192; i += 512) {
      for (let j = 0; j < 512; j++) batch.set(request(C.NBD_CMD_READ, 0, BigInt(i + j + 1), BigInt(((i + j) % 32) * 131072), 131072), j * 28);
      c.socket.write(batch.slice());
    }
    flooders.push(c);
  }
  // Another client is served meanwhile, many requests in flight at once.
  const good = await NbdClient.connect({ path: s.sock });
  const parts = await within(Promise.all(Array.from({ length: 64 }, (_, i) => good.read(i * 65536, 65536))), 'good client during flood');
  const whole = Buffer.concat(parts);
  const expected = await readFile(join(dir, 'src.raw'));
  assert.ok(whole.equals(expected), 'the good client reads the image right');
  await good.disconnect();
  // Queued replies are bounded (64 MiB per connection plus in-flight reads), not 1 GiB.
  const peak = await peakRssKiB(s.child.pid!);
  if (peak !== undefined) {
    t.diagnostic(`server peak RSS ${Math.round(peak / 1024)} MiB`);
    assert.ok(peak < 400 * 1024, `server peak RSS ${peak} KiB`);
  }
  for (const c of flooders) c.destroy();
  assert.equal(s.child.exitCode, null, 'server still running');
  assert.equal(await qemuGuestSha256(['-f', 'raw', s.uri]), sha);
});
