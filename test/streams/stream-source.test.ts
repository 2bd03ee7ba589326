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
import { hostAddon } from '#src/host/native.node.js';
import { ODD_SIZES, oddChunks, oddSource } from '../support/odd-stream.js';
import { makeStreamLayouts } from '../support/stream-corpus.js';

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

/** The layouts this test streams (test/support/stream-corpus.ts), by name. */
async function images(dir: string): Promise<Record<string, string>> {
  const l = await makeStreamLayouts(dir, 32);
  return {
    'qemu-img create + guest writes': l.guest,
    'qcow (v1)': l.v1,
    zlib: l.zlib,
    'zstd, 2 MiB clusters': l.zstd2m,
    '512-byte clusters': l.c512,
    'extended L2': l.extl2,
    'internal snapshot (held clusters)': l.snap,
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
  // With the host addon's non-waiting reads a non-blocking pipe is read as any other (poll(2)
  // waits for it); without them readSync fails with EAGAIN and Node's stream takes over.
  assert.deepEqual(await hashThroughFdSource(file, true), { hash: sha256(data), fellBack: !hostAddon()?.readNoWait });
});

test('the addon grows a pipe to 1 MiB and leaves other descriptors alone', { skip: !hostAddon()?.growPipe && 'addon without growPipe' }, async () => {
  const addonPath = fileURLToPath(new URL('../../build/Release/qcow_host.node', import.meta.url));
  const script = `
    const m = { exports: {} };
    process.dlopen(m, ${JSON.stringify(addonPath)});
    console.log(JSON.stringify([m.exports.growPipe(0, 1048576), m.exports.growPipe(3, 1048576)]));
  `;
  // fd 0 a pipe, fd 3 a regular file: growPipe answers -1 there and does not throw.
  const r = await run('bash', ['-c', `echo | node -e "$0" 3<"$1"`, script, FD_SOURCE]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), [1048576, -1]);
});
