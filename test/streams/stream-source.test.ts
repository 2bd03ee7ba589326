/**
 * Images read from a StreamSource (what `fdSource` makes of a pipe) and from chunks, at odd sizes
 * smaller and larger than a cluster, come out byte-identical to qemu-img's convert of the file:
 * plain, compressed (zlib and zstd with 2 MiB clusters), 512-byte and extended-L2 clusters, qcow (v1), and
 * clusters that arrive before the table naming them (held, then spilled). A stream that ends
 * inside a data cluster fails with one line. `fdSource` reads a real pipe, and through its
 * fallback one that Node's own stream has made non-blocking.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch, sha256 } from '../support/qemu.js';
import { MemoryStore } from '#src/storage/memory.js';
import { rawFormat } from '#src/formats/index.js';
import { readImageStream } from '#src/streams/read-image.js';
import { memorySpill } from '#src/streams/spill.js';
import type { StreamSource } from '#src/streams/cluster-reader.js';
import { ODD_SIZES, oddChunks, oddSource } from '../support/odd-stream.js';

const MiB = 2 ** 20;

/** The image on `input` into a raw image in memory; its bytes. */
async function convertToRaw(input: StreamSource | AsyncIterable<Uint8Array>, size: number, options: { bufferBytes?: number; spill?: boolean } = {}): Promise<Uint8Array> {
  const store = new MemoryStore(new Uint8Array(size));
  const target = await rawFormat.open(store);
  await readImageStream(input, async () => target, {
    targetIsZero: true,
    bufferBytes: options.bufferBytes,
    spill: options.spill ? { store: memorySpill(), limit: 256 * MiB } : undefined,
  });
  await target.close();
  const out = new Uint8Array(size);
  await store.read(0, out);
  return out;
}

async function images(dir: string): Promise<Record<string, string>> {
  const p = (n: string) => join(dir, n);
  const io = (img: string, ...cmds: string[]) => qemuIo(['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), img]);
  await qemuImg(['create', '-q', '-f', 'qcow2', p('guest.qcow2'), '32M']);
  for (const i of [9, 3, 7, 1, 5]) await io(p('guest.qcow2'), `write -P ${i} ${i}M 512k`);
  await io(p('guest.qcow2'), 'write -z 20M 1M', 'write -P 0x22 30M 4k', 'write -P 0x33 31M 700k');
  await qemuImg(['convert', '-c', '-O', 'qcow2', p('guest.qcow2'), p('zlib.qcow2')]);
  await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=2M', p('guest.qcow2'), p('zstd-2m.qcow2')]);
  await qemuImg(['convert', '-O', 'qcow2', '-o', 'cluster_size=512', p('guest.qcow2'), p('c512.qcow2')]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', p('extl2.qcow2'), '32M']);
  await io(p('extl2.qcow2'), 'write -P 5 4k 8k', 'write -P 6 1M 300k', 'write -z 2M 64k');
  // Clusters the snapshot still names come before the tables that name them: held.
  await qemuImg(['create', '-q', '-f', 'qcow2', p('snap.qcow2'), '32M']);
  await io(p('snap.qcow2'), 'write -P 1 0 4M', 'write -P 2 20M 1M');
  await qemuImg(['snapshot', '-c', 'one', p('snap.qcow2')]);
  await io(p('snap.qcow2'), 'write -P 3 1M 1M', 'write -P 4 30M 64k', 'discard 20M 512k');
  // qcow (v1): 4 KiB clusters, each L2 table just before the data it maps.
  await qemuImg(['create', '-q', '-f', 'qcow', p('v1.qcow'), '32M']);
  await qemuIo(['-f', 'qcow', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 17M 300k', '-c', 'write -P 3 7M 4k', '-c', 'write -P 4 31M 70000', p('v1.qcow')]);
  return {
    'qemu-img create + guest writes': p('guest.qcow2'),
    'qcow (v1)': p('v1.qcow'),
    zlib: p('zlib.qcow2'),
    'zstd, 2 MiB clusters': p('zstd-2m.qcow2'),
    '512-byte clusters': p('c512.qcow2'),
    'extended L2': p('extl2.qcow2'),
    'internal snapshot (held clusters)': p('snap.qcow2'),
  };
}

test('a source read at odd sizes and chunks of odd sizes give what qemu-img convert gives', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const [name, img] of Object.entries(await images(dir))) {
    const want = join(dir, 'want.raw');
    await qemuImg(['convert', '-O', 'raw', img, want]);
    const expected = sha256(new Uint8Array(await readFile(want)));
    const size = (await readFile(want)).length;
    const file = new Uint8Array(await readFile(img));
    for (const sizes of [ODD_SIZES, [...ODD_SIZES].reverse(), [65_536]]) {
      assert.equal(sha256(await convertToRaw(oddSource(file, sizes), size)), expected, `${name}, source read at ${sizes.join('/')}`);
      assert.equal(sha256(await convertToRaw(oddChunks(file, sizes), size)), expected, `${name}, chunks of ${sizes.join('/')}`);
    }
    if (name.startsWith('internal snapshot')) {
      // Held clusters past a small memory budget go to the spill and come back intact.
      assert.equal(sha256(await convertToRaw(oddSource(file, ODD_SIZES), size, { bufferBytes: 256 * 1024, spill: true })), expected, `${name}, spilled`);
    }
  }
});

test('a source that ends inside a data cluster: one line saying so', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'guest.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '16M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 7 0 4M', img]);
  const file = new Uint8Array(await readFile(img));
  // Cut 1000 bytes into the last data cluster.
  const cut = file.subarray(0, file.length - 65_536 + 1000);
  for (const input of [oddSource(cut, ODD_SIZES), oddChunks(cut, ODD_SIZES)]) {
    await assert.rejects(convertToRaw(input, 16 * MiB), (e: Error & { code?: string }) => {
      assert.equal(e.code, 'QCOW_CORRUPT');
      assert.match(e.message, /^the stream ended at \d+ bytes, inside a data cluster the image maps$/);
      return true;
    });
  }
});

const FD_SOURCE = fileURLToPath(new URL('../../dist/streams/fd-source.node.js', import.meta.url));

/** A child that reads its standard input with fdSource (after making it non-blocking, if asked) and prints its sha256. */
async function hashThroughFdSource(file: string, nonBlocking: boolean): Promise<{ hash: string; fellBack: boolean }> {
  const script = `
    const { fdSource } = await import(${JSON.stringify(FD_SOURCE)});
    const { createHash } = await import('node:crypto');
    // Opening process.stdin on a pipe sets O_NONBLOCK on fd 0 (libuv): readSync then fails with EAGAIN.
    if (${nonBlocking}) process.stdin.pause();
    const src = fdSource(0, () => (console.error('fallback'), process.stdin));
    const h = createHash('sha256');
    const buf = new Uint8Array(300000);
    for (let n; (n = await src.read(buf)) > 0; ) h.update(buf.subarray(0, n));
    console.log(h.digest('hex'));
  `;
  // The writer pauses after 100000 bytes: the reader finds the pipe empty at least once.
  const r = await run('bash', ['-c', `(head -c 100000 '${file}'; sleep 0.3; tail -c +100001 '${file}') | node --input-type=module -e "$0"`, script]);
  assert.equal(r.code, 0, r.stderr);
  return { hash: r.stdout.trim(), fellBack: r.stderr.includes('fallback') };
}

test('fdSource reads a pipe, and one made non-blocking through its fallback', async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'data.bin');
  const data = new Uint8Array(randomBytes(5 * MiB + 123));
  await writeFile(file, data);
  assert.deepEqual(await hashThroughFdSource(file, false), { hash: sha256(data), fellBack: false });
  assert.deepEqual(await hashThroughFdSource(file, true), { hash: sha256(data), fellBack: true });
});
