/**
 * Reads answered synchronously (commands.ts readNow): a read of one run of plain data clusters
 * that the device maps from metadata it holds (BlockDevice.plainRunNow) goes out at once, by
 * sendfile on read-only exports and from a read that never waits for the disk on writable ones,
 * without block status or mapping calls. What a client gets must not change: the image's bytes,
 * hole chunks where block status has holes (metadata preallocation included), reads after
 * overlapping writes seeing the writes, and errors for bad requests.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import type { BlockDevice } from '#src/core/block-device.js';
import { qcow2Format } from '#src/formats/qcow2/format.js';
import { hostAddon } from '#src/host/native.node.js';
import { NBD_CMD_READ, NBD_EINVAL, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE } from '#src/nbd/constants.js';
import { NbdServer } from '#src/nbd/server.js';
import { FileStore } from '#src/storage/file.node.js';
import { NbdClient } from '../support/nbd-client.js';
import { randomBytes, scratch } from '../support/qemu.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const addon = hostAddon();
const noAddon = !addon?.sendFileCached || !addon.preadNoWait ? 'host addon without sendFileCached / preadNoWait' : false;

/** A qcow2 image whose first half is data (random bytes) and second half unallocated. */
async function makeImage(t: TestContext, options: Record<string, string> = {}): Promise<{ file: string; content: Uint8Array }> {
  const file = join(await scratch(t), 'disk.qcow2');
  const store = await FileStore.open(file, { create: true });
  await qcow2Format.create(store, { size: SIZE, options });
  const dev = await qcow2Format.open(store);
  const content = new Uint8Array(SIZE);
  content.set(randomBytes(SIZE / 2, 5));
  if (options.preallocation === 'metadata') {
    // Data in the first MiB only: the rest of the preallocated clusters are holes of the file.
    content.fill(0, MiB);
    await dev.write(0, content.subarray(0, MiB));
  } else await dev.write(0, content.subarray(0, SIZE / 2));
  await dev.close();
  return { file, content };
}

/** Serve `file`, counting the device's block status calls and the store's fast reads. */
async function serve(t: TestContext, file: string, readOnly: boolean) {
  const store = await FileStore.open(file, { readOnly, cachedReadsInline: true });
  const dev: BlockDevice = await qcow2Format.open(store, { readOnly });
  const counts = { blockStatus: 0, sendCached: 0, readCachedNow: 0 };
  const blockStatus = dev.blockStatus.bind(dev);
  dev.blockStatus = (offset, length) => (counts.blockStatus++, blockStatus(offset, length));
  const send = store.sendCached;
  if (send) store.sendCached = (...args) => (counts.sendCached++, send(...args));
  const readCached = store.readCachedNow;
  if (readCached) (store as { readCachedNow?: FileStore['readCachedNow'] }).readCachedNow = (offset, into) => (counts.readCachedNow++, readCached(offset, into));
  const server = new NbdServer({ persistent: true, exp: { name: '', description: '', device: dev, readOnly } });
  const path = join(file, '..', readOnly ? 'ro.sock' : 'rw.sock');
  await server.listen({ path });
  t.after(async () => {
    await server.close();
    await dev.close();
  });
  return { address: { path }, counts };
}

const equal = (a: Uint8Array, b: Uint8Array, what: string) => assert.ok(Buffer.from(a).equals(b), what);

test('read-only qcow2 export: data reads go out at once by sendfile, holes still come as hole chunks', { skip: noAddon }, async (t) => {
  const { file, content } = await makeImage(t);
  const { address, counts } = await serve(t, file, true);
  const c = await NbdClient.connect(address, { structuredReplies: true });
  // The first read takes the usual way: block status has not said yet whether the image has
  // metadata preallocation. It loads the data into the page cache too.
  equal(await c.read(0, SIZE / 2), content.subarray(0, SIZE / 2), 'first read');
  const before = counts.blockStatus;
  const sends = counts.sendCached;
  const reads = [];
  for (let o = 0; o < SIZE / 2; o += 256 * 1024) reads.push(c.read(o, 256 * 1024).then((data) => ({ o, data })));
  for (const { o, data } of await Promise.all(reads)) equal(data, content.subarray(o, o + 256 * 1024), `read at ${o}`);
  assert.equal(counts.blockStatus, before, 'no block status for reads of plain data');
  assert.ok(counts.sendCached - sends >= reads.length, 'each went by sendfile');
  // Data and a hole, and a hole alone: the usual way, with hole chunks.
  const mixed = await c.request(NBD_CMD_READ, 0, SIZE / 2 - 65536, 131072);
  equal(mixed.data!, content.subarray(SIZE / 2 - 65536, SIZE / 2 + 65536), 'data then hole');
  assert.deepEqual(mixed.chunkTypes, [NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE]);
  assert.deepEqual((await c.request(NBD_CMD_READ, 0, SIZE - 65536, 65536)).chunkTypes, [NBD_REPLY_TYPE_OFFSET_HOLE]);
  // Bad requests are answered as before.
  await assert.rejects(c.read(SIZE - 4096, 8192), (e: Error & { errno?: number }) => e.errno === NBD_EINVAL);
  await c.disconnect();
});

test('simple replies: reads of a read-only qcow2 export return the image bytes', { skip: noAddon }, async (t) => {
  const { file, content } = await makeImage(t);
  const { address } = await serve(t, file, true);
  const c = await NbdClient.connect(address, { structuredReplies: false, baseAllocation: false });
  equal(await c.read(0, SIZE), content, 'whole image');
  equal(await c.read(12345, 300000), content.subarray(12345, 312345), 'unaligned');
  await c.disconnect();
});

test('metadata preallocation: holes of the file inside data clusters still come as hole chunks', { skip: noAddon }, async (t) => {
  const { file, content } = await makeImage(t, { preallocation: 'metadata' });
  const { address } = await serve(t, file, true);
  const c = await NbdClient.connect(address, { structuredReplies: true });
  for (let i = 0; i < 2; i++) {
    const r = await c.request(NBD_CMD_READ, 0, 2 * MiB, 65536);
    equal(r.data!, content.subarray(2 * MiB, 2 * MiB + 65536), 'zeros');
    assert.deepEqual(r.chunkTypes, [NBD_REPLY_TYPE_OFFSET_HOLE]);
  }
  equal(await c.read(0, MiB), content.subarray(0, MiB), 'data');
  await c.disconnect();
});

test('writable qcow2 export: reads from the page cache at once, and never ahead of an overlapping write', { skip: noAddon }, async (t) => {
  const { file, content } = await makeImage(t);
  const { address, counts } = await serve(t, file, false);
  const c = await NbdClient.connect(address, { structuredReplies: true });
  equal(await c.read(0, SIZE / 2), content.subarray(0, SIZE / 2), 'first read');
  const fast = counts.readCachedNow;
  equal(await c.read(MiB, 256 * 1024), content.subarray(MiB, MiB + 256 * 1024), 'cached read');
  assert.ok(counts.readCachedNow > fast, 'read without waiting');
  // Pipelined: each read is sent right behind a write it overlaps, without waiting for the write.
  const jobs = [];
  for (let i = 0; i < 16; i++) {
    const at = i * 192 * 1024;
    const data = randomBytes(64 * 1024, 100 + i);
    content.set(data, at + 4096);
    // What read i must see: writes 0..i (write i + 1 overlaps it too, but is sent after it).
    const expected = content.slice(at, at + 256 * 1024);
    jobs.push(c.write(at + 4096, data));
    jobs.push(c.read(at, 256 * 1024).then((got) => equal(got, expected, `read behind write ${i}`)));
  }
  await Promise.all(jobs);
  equal(await c.read(0, SIZE), content, 'whole image');
  await c.disconnect();
});
