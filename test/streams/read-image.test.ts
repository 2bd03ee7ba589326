/**
 * Reading an image from a stream: every layout qemu-img and qcow write, converted in one pass and
 * byte-identical to qemu-img's convert of the file; a server without Range support; bad streams
 * (cut short, lying, pointing backwards, over the buffer) with one line each and no target left.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { QCOW_BIN, needs, qemuImg, qemuIo, run, scratch, sha256 } from '../support/qemu.js';
import { makeStreamLayouts } from '../support/stream-corpus.js';
import { MemoryStore } from '#src/storage/memory.js';
import { qcow2Format, rawFormat } from '#src/formats/index.js';
import { readImageStream, webStreamChunks } from '#src/streams/read-image.js';
import { hostAddon } from '#src/host/native.node.js';

const MiB = 2 ** 20;

/** `cat IMG | qcow convert ARGS - OUT`, with the stream statistics line. */
async function fromPipe(img: string, out: string, args: string[], cwd: string) {
  const q = (a: string) => `'${a}'`;
  return run('bash', ['-c', `set -o pipefail; cat ${q(img)} | ${[QCOW_BIN, 'convert', ...args, '-', out].map(q).join(' ')}`], { cwd, env: { ...process.env, QCOW_STREAM_STATS: '1' } });
}

const peakOf = (stderr: string) => Number(/peak buffer (\d+) bytes/.exec(stderr)?.[1] ?? NaN);

/** Images of every layout, as qemu-img and qemu-io (test/support/stream-corpus.ts) and qcow's own stream writer make them. */
async function corpus(dir: string): Promise<Record<string, string>> {
  const l = await makeStreamLayouts(dir, 64);
  const ours = join(dir, 'qcow-stream.qcow2');
  const r = await run('bash', ['-c', `'${QCOW_BIN}' convert -c -O qcow2 '${l.guest}' - > '${ours}'`]);
  assert.equal(r.code, 0, r.stderr);
  return {
    'qemu-img create + guest writes': l.guest,
    'qemu-img convert': l.converted,
    'qemu-img convert -c (zlib)': l.zlib,
    'qemu-img convert -c, zstd, 2 MiB clusters': l.zstd2m,
    '512-byte clusters': l.c512,
    'extended L2, 128 KiB clusters': l.extl2,
    'compat=0.10': l.v2,
    'internal snapshot present': l.snap,
    'qcow (v1)': l.v1,
    "qcow's own stream (-c)": ours,
  };
}

test('every layout streams into raw byte-identical to qemu-img convert, and into qcow2 check-clean', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const images = await corpus(dir);
  const peaks = new Map<string, number>();
  for (const [name, img] of Object.entries(images)) {
    const want = join(dir, 'want.raw');
    await qemuImg(['convert', '-O', 'raw', img, want]);
    const got = join(dir, 'got.raw');
    const r = await fromPipe(img, got, ['-O', 'raw'], dir);
    assert.equal(r.code, 0, `${name}: ${r.stderr}`);
    assert.equal(sha256(new Uint8Array(await readFile(got))), sha256(new Uint8Array(await readFile(want))), name);
    peaks.set(name, peakOf(r.stderr));
    const q = join(dir, 'got.qcow2');
    assert.equal((await fromPipe(img, q, ['-O', 'qcow2'], dir)).code, 0, name);
    await qemuImg(['check', '-q', q]);
    await qemuImg(['compare', '-q', img, q]);
  }
  // Tables before data: nothing waits, except clusters that only the snapshot still names.
  for (const [name, peak] of peaks) {
    if (name.startsWith('internal snapshot')) assert.ok(peak > 0 && peak < 8 * MiB, `${name}: ${peak}`);
    else assert.equal(peak, 0, name);
  }
  t.diagnostic(`peak buffers: ${[...peaks].map(([n, p]) => `${n}: ${p}`).join('; ')}`);
});

test('an overlay on a stream: its backing file is opened as usual and the result is flat', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '16M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 8M', join(dir, 'base.qcow2')]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2')]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x22 1M 64k', '-c', 'write -z 4M 64k', join(dir, 'top.qcow2')]);
  const out = join(dir, 'flat.raw');
  assert.equal((await fromPipe(join(dir, 'top.qcow2'), out, ['-O', 'raw'], dir)).code, 0);
  await qemuImg(['compare', '-q', '-f', 'qcow2', '-F', 'raw', join(dir, 'top.qcow2'), out], dir);
});

test('a server without Range support: qcow converts its image in one pass, qemu-img cannot read it', needs('qemu-img', 'qemu-io', 'python3'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'disk.qcow2'), '32M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x33 0 3M', '-c', 'write -P 0x44 20M 1M', join(dir, 'disk.qcow2')]);
  const port = await freePort();
  const server = spawn('python3', ['-m', 'http.server', '--bind', '127.0.0.1', String(port)], { cwd: dir, stdio: 'ignore' });
  t.after(() => void server.kill());
  const url = `http://127.0.0.1:${port}/disk.qcow2`;
  for (let i = 0; i < 50 && (await fetch(url).then((r) => r.status, () => 0)) !== 200; i++) await new Promise((r) => setTimeout(r, 100));
  const out = join(dir, 'out.raw');
  const r = await run(QCOW_BIN, ['convert', '-O', 'raw', url, out], { env: { ...process.env, QCOW_STREAM_STATS: '1' } });
  assert.equal(r.code, 0, r.stderr);
  await qemuImg(['compare', '-q', '-f', 'qcow2', '-F', 'raw', join(dir, 'disk.qcow2'), out]);
  const theirs = await run('qemu-img', ['convert', '-O', 'raw', url, join(dir, 'theirs.raw')]);
  assert.notEqual(theirs.code, 0);
});

test('bad streams: one line each, and no half-written target left behind', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const good = join(dir, 'good.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', good, '16M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 2M', '-c', 'write -P 2 8M 1M', good]);
  const bytes = new Uint8Array(await readFile(good));
  const dv = new DataView(bytes.buffer);
  const variants: [string, Uint8Array, RegExp, string[]?][] = [
    ['cut inside a data cluster', bytes.subarray(0, 0x50000 + 4096), /stream ended at \d+ bytes, inside a data cluster/],
    ['cut between clusters', bytes.subarray(0, 0x60000), /stream ended at 393216 bytes, before data the image maps/],
    ['cut before an L2 table', bytes.subarray(0, 0x40000), /stream ended at 262144 bytes, before the L2 table at 0x40000/],
    ['cut inside the header', bytes.subarray(0, 80), /stream ended after 80 bytes, inside the qcow2 header/],
    ['not an image', new Uint8Array(4096).fill(7), /not a qcow2 image/, ['-f', 'qcow2']],
  ];
  // A header that claims 1 PiB with the same small L1.
  const lying = bytes.slice();
  new DataView(lying.buffer).setBigUint64(24, 2n ** 50n);
  variants.push(['header lying about the size', lying, /L1 table of \d+ entries for a \d+-byte image/]);
  // The first L2 entry pointing back at cluster 1 (the refcount table, long gone by then).
  const l2At = Number(dv.getBigUint64(Number(dv.getBigUint64(40))) & 0x00fffffffffffe00n);
  const backwards = bytes.slice();
  new DataView(backwards.buffer).setBigUint64(l2At, (1n << 63n) | 0x10000n);
  variants.push(['a table pointing backwards', backwards, /points back to 0x10000, which the stream has already passed/]);
  for (const [name, data, line, extra] of variants) {
    const img = join(dir, 'bad.img');
    await writeFile(img, data);
    const out = join(dir, 'out.raw');
    const r = await fromPipe(img, out, ['-O', 'raw', ...(extra ?? [])], dir);
    assert.notEqual(r.code, 0, name);
    const lines = r.stderr.trim().split('\n').filter((l) => !l.startsWith('qcow: stream:'));
    assert.equal(lines.length, 1, `${name}: ${r.stderr}`);
    assert.match(lines[0]!, line, name);
    assert.ok(!existsSync(out), `${name}: the target was removed`);
  }
  // Over the buffer: an image whose snapshot holds clusters ahead of their tables.
  const snap = join(dir, 'snap.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', snap, '16M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 4M', snap]);
  await qemuImg(['snapshot', '-c', 'one', snap]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 3 1M 1M', snap]);
  const r = await fromPipe(snap, join(dir, 'out.raw'), ['-O', 'raw', '--stream-buffer', '64k'], dir);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /needs more than 65536 bytes of clusters held .*--stream-buffer SIZE/);
});

test('-n into an existing image: a bad stream leaves it byte for byte as it was, a good one lands whole', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const good = join(dir, 'good.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', good, '16M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 2M', '-c', 'write -P 2 8M 1M', good]);
  const cut = join(dir, 'cut.qcow2');
  // Cut 1.5 MiB into the data: much of it was written by then.
  await writeFile(cut, (await readFile(good)).subarray(0, 0x50000 + 0x180000 + 4096));
  for (const format of ['qcow2', 'raw']) {
    const target = join(dir, `target.${format}`);
    await qemuImg(['create', '-q', '-f', format, target, '16M']);
    await qemuIo(['-f', format, '-c', 'write -P 0x5a 0 16M', target]);
    const before = sha256(new Uint8Array(await readFile(target)));
    const bad = await fromPipe(cut, target, ['-n', '-O', format], dir);
    assert.notEqual(bad.code, 0, format);
    assert.match(bad.stderr, /stream ended at \d+ bytes, inside a data cluster/, format);
    assert.equal(sha256(new Uint8Array(await readFile(target))), before, `${format}: the target is unchanged`);
    const ok = await fromPipe(good, target, ['-n', '-O', format], dir);
    assert.equal(ok.code, 0, `${format}: ${ok.stderr}`);
    await qemuImg(['compare', '-q', '-f', 'qcow2', '-F', format, good, target]);
    if (format === 'qcow2') await qemuImg(['check', '-q', target]);
  }
  const left = (await readdir(dir)).filter((n) => n.startsWith('.qcow-staging-'));
  assert.deepEqual(left, [], 'no staging folder is left behind');
});

test('the library: a web ReadableStream into an image in memory', async () => {
  const src = new MemoryStore();
  await qcow2Format.create(src, { size: 3 * MiB, options: { cluster_size: '4096' } });
  const dev = await qcow2Format.open(src);
  const data = new Uint8Array(100_000).map((_, i) => i % 251);
  await dev.write(12345, data);
  await dev.close();
  const file = await readAllStore(src);
  const stream = new ReadableStream<Uint8Array>({
    start(c) {
      for (let i = 0; i < file.length; i += 7000) c.enqueue(file.slice(i, i + 7000));
      c.close();
    },
  });
  const target = await rawFormat.open(new MemoryStore(new Uint8Array(3 * MiB)));
  const r = await readImageStream(webStreamChunks(stream), async () => target, { targetIsZero: true });
  assert.equal(r.format, 'qcow2');
  const got = new Uint8Array(data.length);
  await target.read(12345, got);
  assert.deepEqual(got, data);
});

async function readAllStore(store: MemoryStore): Promise<Uint8Array> {
  const out = new Uint8Array(await store.size());
  await store.read(0, out);
  return out;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

test('encrypted images from a stream: LUKS and legacy AES with the password, one line without it or with a wrong one', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await writeFile(join(dir, 'pw'), 'secret');
  await writeFile(join(dir, 'wrong'), 'not it');
  for (const fmt of ['luks', 'aes']) {
    const img = join(dir, `${fmt}.qcow2`);
    const secret = ['--object', 'secret,id=s0,data=secret'];
    await qemuImg(['create', '-q', '-f', 'qcow2', ...secret, '-o', `encrypt.format=${fmt},encrypt.key-secret=s0${fmt === 'luks' ? ',encrypt.iter-time=10' : ''}`, img, '16M']);
    const opts = `driver=qcow2,file.filename=${img},encrypt.key-secret=s0`;
    await qemuIo([...secret, '--image-opts', '-c', 'write -P 0x42 1M 300k', '-c', 'write -P 0x43 9M 64k', opts]);
    const want = join(dir, 'want.raw');
    await qemuImg(['convert', ...secret, '--image-opts', opts, '-O', 'raw', want]);
    const got = join(dir, 'got.raw');
    const r = await fromPipe(img, got, ['--password-file', join(dir, 'pw'), '-O', 'raw'], dir);
    assert.equal(r.code, 0, `${fmt}: ${r.stderr}`);
    assert.equal(sha256(new Uint8Array(await readFile(got))), sha256(new Uint8Array(await readFile(want))), fmt);
  }
  const none = await fromPipe(join(dir, 'luks.qcow2'), join(dir, 'x.raw'), ['-O', 'raw'], dir);
  assert.notEqual(none.code, 0);
  assert.match(none.stderr, /password is required/);
  const wrong = await fromPipe(join(dir, 'luks.qcow2'), join(dir, 'x.raw'), ['--password-file', join(dir, 'wrong'), '-O', 'raw'], dir);
  assert.notEqual(wrong.code, 0);
  assert.equal(wrong.stderr.trim().split('\n').filter((l) => !l.startsWith('qcow: stream:')).length, 1, wrong.stderr);
  assert.ok(!existsSync(join(dir, 'x.raw')));
});

test('qcow (v1) from a stream: plain, compressed, an overlay on a backing file, legacy AES, and a relaid image held in a spill folder', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const p = (n: string) => join(dir, n);
  await qemuImg(['create', '-q', '-f', 'qcow', p('v1.qcow'), '64M']);
  await qemuIo(['-f', 'qcow', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 33M 300k', '-c', 'write -P 3 7M 4k', p('v1.qcow')]);
  // qemu-img 7.2 exits 1 after writing a compressed qcow (v1) image without saying why; the image
  // itself compares equal, which is what matters here.
  await run('qemu-img', ['convert', '-c', '-O', 'qcow', p('v1.qcow'), p('v1c.qcow')]);
  await qemuImg(['compare', '-q', p('v1.qcow'), p('v1c.qcow')]);
  await qemuImg(['create', '-q', '-f', 'qcow', '-b', 'v1.qcow', '-F', 'qcow', p('v1top.qcow')]);
  await qemuIo(['-f', 'qcow', '-c', 'write -P 9 512k 64k', p('v1top.qcow')]);
  await writeFile(p('pw'), 'secret');
  const secret = ['--object', 'secret,id=s0,data=secret'];
  await qemuImg(['create', '-q', '-f', 'qcow', ...secret, '-o', 'encrypt.format=aes,encrypt.key-secret=s0', p('v1aes.qcow'), '16M']);
  const opts = `driver=qcow,file.filename=${p('v1aes.qcow')},encrypt.key-secret=s0`;
  await qemuIo([...secret, '--image-opts', '-c', 'write -P 0x42 1M 300k', opts]);
  await qemuImg(['convert', ...secret, '--image-opts', opts, '-O', 'raw', p('v1aes-want.raw')]);
  for (const [img, want, extra] of [
    ['v1.qcow', undefined, []],
    ['v1c.qcow', undefined, []],
    ['v1top.qcow', undefined, []],
    ['v1aes.qcow', 'v1aes-want.raw', ['--password-file', p('pw')]],
  ] as const) {
    const got = p('got.raw');
    const r = await fromPipe(p(img), got, ['-O', 'raw', ...extra], dir);
    assert.equal(r.code, 0, `${img}: ${r.stderr}`);
    assert.equal(peakOf(r.stderr), 0, img);
    if (want) assert.equal(sha256(new Uint8Array(await readFile(got))), sha256(new Uint8Array(await readFile(p(want)))), img);
    else await qemuImg(['compare', '-q', '-f', 'qcow', '-F', 'raw', p(img), got], dir);
  }
  // An L2 table moved to the end of the file: its data arrives first and is held, in memory up to
  // --stream-buffer, then in the spill folder; without a folder, one line. With 64 KiB clusters
  // every structure fills whole 64 KiB units of the stream, so the data's units are named by nothing.
  // (qemu-img cannot choose a qcow cluster size, but QEMU reads any: the empty image is ours.)
  const { writeEmptyImage } = await import('#src/formats/qcow1/create.js');
  const { FileStore } = await import('#src/storage/file.node.js');
  const store = await FileStore.open(p('v1-64k.qcow'), { create: true });
  await writeEmptyImage(store, { size: 64 * MiB, clusterBits: 16, l2Bits: 13 });
  await store.close();
  await qemuIo(['-f', 'qcow', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 40M 2M', '-c', 'write -P 3 7M 64k', p('v1-64k.qcow')]);
  const moved = new Uint8Array(await readFile(p('v1-64k.qcow')));
  const mv = new DataView(moved.buffer);
  const l1At = Number(mv.getBigUint64(40));
  const l2Bytes = 2 ** moved[33]! * 8;
  const l2At = Number(mv.getBigUint64(l1At + 8 * Math.floor((40 * MiB) / (2 ** moved[32]! * (l2Bytes / 8)))));
  const end = Math.ceil(moved.length / 4096) * 4096;
  const relaid = new Uint8Array(end + l2Bytes);
  relaid.set(moved);
  relaid.set(moved.subarray(l2At, l2At + l2Bytes), end);
  relaid.fill(0, l2At, l2At + l2Bytes);
  new DataView(relaid.buffer).setBigUint64(l1At + 8 * Math.floor((40 * MiB) / (2 ** moved[32]! * (l2Bytes / 8))), BigInt(end));
  await writeFile(p('relaid.qcow'), relaid);
  await qemuImg(['compare', '-q', p('v1-64k.qcow'), p('relaid.qcow')]);
  const { mkdir, readdir } = await import('node:fs/promises');
  await mkdir(p('spill1'));
  const held = await fromPipe(p('relaid.qcow'), p('relaid.raw'), ['-O', 'raw', '--stream-buffer', '256k', '--stream-spill', p('spill1')], dir);
  assert.equal(held.code, 0, held.stderr);
  assert.ok(peakOf(held.stderr) > 1024 * 1024, held.stderr);
  await qemuImg(['compare', '-q', '-f', 'qcow', '-F', 'raw', p('v1-64k.qcow'), p('relaid.raw')]);
  assert.deepEqual(await readdir(p('spill1')), [], 'the spill file is removed');
  const over = await fromPipe(p('relaid.qcow'), p('over.raw'), ['-O', 'raw', '--stream-buffer', '256k'], dir);
  assert.notEqual(over.code, 0);
  assert.match(over.stderr, /needs more than 262144 bytes held .*--stream-spill DIR/);
  assert.ok(!existsSync(p('over.raw')));
  // Cut short: one line, no target.
  await writeFile(p('cut.qcow'), (await readFile(p('v1.qcow'))).subarray(0, 40_000));
  const r = await fromPipe(p('cut.qcow'), p('cut.raw'), ['-O', 'raw'], dir);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /the stream ended at \d+ bytes, before/);
  assert.ok(!existsSync(p('cut.raw')));
});

test('raw from a pipe of unknown length into a new raw file (holes kept) or a qcow2 that grows with it, and a buffer that spills to a folder', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const p = (n: string) => join(dir, n);
  const data = new Uint8Array(9 * MiB + 1000);
  data.set(new Uint8Array(3 * MiB).map((_, i) => (i * 7) % 256 || 1));
  data.fill(5, 8 * MiB);
  await writeFile(p('in.raw'), data);
  const r = await fromPipe(p('in.raw'), p('out.raw'), ['-f', 'raw', '-O', 'raw'], dir);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(new Uint8Array(await readFile(p('out.raw'))), data);
  const { stat } = await import('node:fs/promises');
  assert.ok((await stat(p('out.raw'))).blocks * 512 < 6 * MiB, 'the zeros stay holes');
  // Into qcow2 the image grows ahead of the stream and is cut to its length (512-byte rounded).
  const q = await fromPipe(p('in.raw'), p('out.qcow2'), ['-f', 'raw', '-O', 'qcow2'], dir);
  assert.equal(q.code, 0, q.stderr);
  await qemuImg(['check', '-q', p('out.qcow2')]);
  await qemuImg(['compare', '-q', '-f', 'raw', '-F', 'qcow2', p('in.raw'), p('out.qcow2')]);
  const info = JSON.parse((await qemuImg(['info', '--output=json', p('out.qcow2')])).stdout) as { 'virtual-size': number };
  assert.equal(info['virtual-size'], 9 * MiB + 1024);
  // Past several growth steps, with small clusters: only the clusters holding data are allocated.
  const { open: openFile } = await import('node:fs/promises');
  const big = await openFile(p('big.raw'), 'w');
  await big.write(data, 0, data.length, 0);
  await big.write(data.subarray(0, MiB), 0, MiB, 150 * MiB);
  await big.truncate(200 * MiB + 512);
  await big.close();
  const b = await fromPipe(p('big.raw'), p('big.qcow2'), ['-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096'], dir);
  assert.equal(b.code, 0, b.stderr);
  await qemuImg(['check', '-q', p('big.qcow2')]);
  await qemuImg(['compare', '-q', '-f', 'raw', '-F', 'qcow2', p('big.raw'), p('big.qcow2')]);
  const map = JSON.parse((await qemuImg(['map', '--output=json', p('big.qcow2')])).stdout) as { length: number; data: boolean }[];
  assert.equal(map.filter((e) => e.data).reduce((n, e) => n + e.length, 0), 3 * MiB + 1 * MiB + 1 * MiB + 4096, 'data clusters only');
  // qcow (v1) images cannot grow: one line, and no target left.
  const v1 = await fromPipe(p('in.raw'), p('out.qcow'), ['-f', 'raw', '-O', 'qcow'], dir);
  assert.notEqual(v1.code, 0);
  assert.match(v1.stderr, /cannot be read into qcow: its images cannot grow/);
  assert.ok(!existsSync(p('out.qcow')));
  // An image with an internal snapshot holds ~5 MB while waiting for tables: 1 MiB of memory, then the folder.
  await qemuImg(['create', '-q', '-f', 'qcow2', p('snap.qcow2'), '64M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 4M', '-c', 'write -P 2 40M 1M', p('snap.qcow2')]);
  await qemuImg(['snapshot', '-c', 'one', p('snap.qcow2')]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 3 1M 1M', '-c', 'write -P 4 60M 64k', p('snap.qcow2')]);
  const { mkdir } = await import('node:fs/promises');
  await mkdir(p('spill'));
  const s = await fromPipe(p('snap.qcow2'), p('snap.raw'), ['-O', 'raw', '--stream-buffer', '1M', '--stream-spill', p('spill')], dir);
  assert.equal(s.code, 0, s.stderr);
  await qemuImg(['compare', '-q', '-f', 'qcow2', '-F', 'raw', p('snap.qcow2'), p('snap.raw')]);
  assert.deepEqual(await readdir(p('spill')), [], 'the spill file is removed');
  const over = await fromPipe(p('snap.qcow2'), p('over.raw'), ['-O', 'raw', '--stream-buffer', '1M', '--stream-spill', p('spill'), '--stream-spill-size', '2M'], dir);
  assert.notEqual(over.code, 0);
  assert.match(over.stderr, /needs more than 1048576 bytes of memory and 2097152 bytes of spill/);
});

test('SIGTERM while the pipe\'s writer is silent: qcow stops at once with one line and removes its target', needs('qemu-img', 'qemu-io'), async (t) => {
  if (!hostAddon()?.readNoWait) return t.skip('needs the host addon (v6): without it a pipe is read with blocking reads, which wait for the writer');
  const dir = await scratch(t);
  const img = join(dir, 'guest.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '16M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 7 0 4M', img]);
  const out = join(dir, 'out.raw');
  // A named pipe, as a shell's `|` makes (Node's own stdio pipes are sockets, which qcow reads
  // through process.stdin). The writer sends the start of the image, then keeps it open and silent.
  const fifo = join(dir, 'fifo');
  await run('mkfifo', [fifo]);
  const writer = spawn('sh', ['-c', `exec > '${fifo}'; head -c 1000000 '${img}'; exec sleep 60`], { stdio: 'ignore' });
  t.after(() => writer.kill('SIGKILL'));
  const q = spawn('sh', ['-c', `exec '${QCOW_BIN}' convert -O raw - '${out}' < '${fifo}'`], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  q.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => q.on('exit', (code) => resolve(code)));
  // The target exists once the header and tables are in: qcow then waits on the silent pipe.
  while (!existsSync(out)) await new Promise((r) => setTimeout(r, 20));
  q.kill('SIGTERM');
  const code = await exited;
  assert.equal(writer.exitCode, null, 'qcow ended only when the writer did');
  assert.notEqual(code, 0);
  assert.match(stderr, /^qcow: .*(aborted|interrupted)/);
  assert.equal(stderr.trim().split('\n').length, 1, stderr);
  assert.equal(existsSync(out), false, 'the half-written target is removed');
});
