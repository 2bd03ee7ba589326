/**
 * Zero writes, unmaps, discards and copy-on-write on images with extended L2 entries, in memory:
 * each case holds the entry's subcluster bitmap to what QEMU 7.2 leaves there (zero bits per
 * subcluster, host clusters kept by partial zeroing, a refused part written as zero bytes) and
 * the guest content to what was written.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { readHeader } from '#src/formats/qcow2/read-header.js';
import { QcowError } from '#src/core/errors.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;
const SUB = 2 * KiB;

async function fresh(size = 1024 * KiB): Promise<{ store: MemoryStore; dev: Qcow2Device }> {
  const store = new MemoryStore(undefined, { name: 'sub.qcow2' });
  await createQcow2(store, { size, options: { extended_l2: 'on' } });
  return { store, dev: await Qcow2Device.open(store, {}) };
}

/** Entry `n` of the first L2 table as it is on disk: host offset and the two bitmap halves. */
async function entry(store: MemoryStore, n: number): Promise<{ host: number; zero: number[]; alloc: number[] }> {
  const { header } = await readHeader(store);
  const bytes = store.bytes();
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const l2 = Number(v.getBigUint64(header.l1TableOffset) & 0x00ff_ffff_ffff_fe00n);
  assert.notEqual(l2, 0, 'the L2 table exists');
  const host = Number(v.getBigUint64(l2 + n * 16) & 0x00ff_ffff_ffff_fe00n);
  const zb = v.getUint32(l2 + n * 16 + 8);
  const ab = v.getUint32(l2 + n * 16 + 12);
  const bits = (w: number) => [...Array(32).keys()].filter((i) => (w >>> i) & 1);
  return { host, zero: bits(zb), alloc: bits(ab) };
}

const range = (a: number, b: number) => [...Array(b - a + 1).keys()].map((i) => a + i);

async function expectBytes(dev: Qcow2Device, offset: number, expected: Uint8Array): Promise<void> {
  const got = new Uint8Array(expected.length);
  await dev.read(offset, got);
  assert.deepEqual(got, expected);
}

test('a subcluster-aligned zero write sets zero bits, clears allocation bits and keeps the host cluster', async () => {
  const { store, dev } = await fresh();
  await dev.write(0, new Uint8Array(CLUSTER).fill(7));
  await dev.flush();
  const before = await entry(store, 0);
  await dev.writeZeroes(SUB, 3 * SUB, { mayUnmap: true });
  await dev.flush();
  const e = await entry(store, 0);
  assert.equal(e.host, before.host, 'a partial cluster keeps its host cluster, even with unmap');
  assert.deepEqual(e.zero, [1, 2, 3]);
  assert.deepEqual(e.alloc, [0, ...range(4, 31)]);
  const want = new Uint8Array(CLUSTER).fill(7);
  want.fill(0, SUB, 4 * SUB);
  await expectBytes(dev, 0, want);
  await dev.close();
});

test('a partial-subcluster zero write over nothing zeroes the whole subcluster without allocating', async () => {
  const { store, dev } = await fresh();
  // A neighbour cluster makes the table; cluster 1 stays unallocated.
  await dev.write(0, new Uint8Array(512).fill(1));
  await dev.writeZeroes(CLUSTER + 15 * SUB + KiB, 8 * KiB, { mayUnmap: false });
  await dev.flush();
  const e = await entry(store, 1);
  assert.equal(e.host, 0);
  assert.deepEqual(e.alloc, []);
  assert.deepEqual(e.zero, range(15, 19));
  await dev.close();
});

test('a partial-subcluster zero write over data writes zero bytes there (copy-on-write of the subcluster)', async () => {
  const { store, dev } = await fresh();
  await dev.write(0, new Uint8Array(4 * SUB).fill(9));
  await dev.writeZeroes(SUB + 512, 512, { mayUnmap: true });
  await dev.flush();
  const e = await entry(store, 0);
  assert.deepEqual(e.alloc, [0, 1, 2, 3]);
  assert.deepEqual(e.zero, []);
  const want = new Uint8Array(4 * SUB).fill(9);
  want.fill(0, SUB + 512, SUB + 1024);
  await expectBytes(dev, 0, want);
  // Refused outright when only metadata may change.
  await assert.rejects(dev.writeZeroes(512, 512, { mayUnmap: false, fastOnly: true }), (err: unknown) => err instanceof QcowError);
  await dev.close();
});

test('zero with unmap drops whole clusters only; without unmap the host cluster stays', async () => {
  const { store, dev } = await fresh();
  await dev.write(0, new Uint8Array(3 * CLUSTER).fill(3));
  await dev.flush();
  const host1 = (await entry(store, 1)).host;
  await dev.writeZeroes(0, CLUSTER / 2, { mayUnmap: true });
  await dev.writeZeroes(CLUSTER, CLUSTER, { mayUnmap: false });
  await dev.writeZeroes(2 * CLUSTER, CLUSTER, { mayUnmap: true });
  await dev.flush();
  const e0 = await entry(store, 0);
  assert.notEqual(e0.host, 0);
  assert.deepEqual(e0.zero, range(0, 15));
  assert.deepEqual(e0.alloc, range(16, 31));
  const e1 = await entry(store, 1);
  assert.equal(e1.host, host1);
  assert.deepEqual(e1.zero, range(0, 31));
  assert.deepEqual(e1.alloc, []);
  const e2 = await entry(store, 2);
  assert.equal(e2.host, 0, 'unmapped');
  assert.deepEqual(e2.zero, range(0, 31));
  await expectBytes(dev, 0, new Uint8Array(3 * CLUSTER).fill(3).fill(0, 0, CLUSTER / 2).fill(0, CLUSTER));
  // A later write into the zeroed, kept cluster writes in place and allocates its subcluster.
  await dev.write(CLUSTER + SUB, new Uint8Array(512).fill(5));
  await dev.flush();
  const again = await entry(store, 1);
  assert.equal(again.host, host1);
  assert.deepEqual(again.alloc, [1]);
  assert.deepEqual(again.zero, [0, ...range(2, 31)]);
  await dev.close();
});

test('a zero write at the end of an image whose size is not subcluster aligned zeroes the last subcluster', async () => {
  const { store, dev } = await fresh(2083 * KiB);
  await dev.write(0, new Uint8Array(512));
  await dev.writeZeroes(32 * CLUSTER, 35 * KiB, { mayUnmap: false });
  await dev.flush();
  const e = await entry(store, 32);
  assert.equal(e.host, 0);
  assert.deepEqual(e.zero, range(0, 17));
  await dev.close();
});

test('a zero write that covers a compressed cluster partly writes zero bytes (the cluster is decompressed)', async () => {
  const { store, dev } = await fresh();
  const data = new Uint8Array(CLUSTER).fill(0x42);
  await dev.writeCompressed(0, data);
  await dev.writeCompressed(CLUSTER, data);
  await dev.writeZeroes(CLUSTER / 2, CLUSTER, { mayUnmap: true });
  await dev.flush();
  for (const n of [0, 1]) {
    const e = await entry(store, n);
    assert.deepEqual(e.alloc, range(0, 31), `cluster ${n} is a normal cluster now`);
    assert.deepEqual(e.zero, []);
  }
  const want = new Uint8Array(2 * CLUSTER).fill(0x42).fill(0, CLUSTER / 2, CLUSTER + CLUSTER / 2);
  await expectBytes(dev, 0, want);
  await dev.close();
});

test('a discard without a backing file leaves an unallocated cluster alone and zeroes an allocated one', async () => {
  const { store, dev } = await fresh();
  await dev.write(0, new Uint8Array(CLUSTER).fill(1));
  await dev.discard(0, 2 * CLUSTER);
  await dev.flush();
  const e0 = await entry(store, 0);
  assert.equal(e0.host, 0);
  assert.deepEqual(e0.zero, range(0, 31));
  const e1 = await entry(store, 1);
  assert.deepEqual(e1.zero, []);
  assert.deepEqual(e1.alloc, []);
  await dev.close();
});

test('a contradictory bitmap fails reads and writes of its cluster as a corruption', async () => {
  const { store, dev } = await fresh();
  await dev.write(0, new Uint8Array(3 * CLUSTER).fill(1));
  await dev.close();
  // Cluster 1: subcluster 0 both allocated and zero.
  const { header } = await readHeader(store);
  const bytes = store.bytes();
  const l2 = Number(new DataView(bytes.buffer).getBigUint64(header.l1TableOffset) & 0x00ff_ffff_ffff_fe00n);
  await store.write(l2 + 16 + 8, new Uint8Array([0, 0, 0, 1]));
  const twin = new MemoryStore(store.bytes(), { name: 'twin.qcow2' });
  const events: string[] = [];
  const again = await Qcow2Device.open(store, { onCorruption: (e) => events.push(e.message) });
  await assert.rejects(again.read(CLUSTER, new Uint8Array(512)));
  assert.match(events[0] ?? '', /Invalid cluster entry found {2}\(L2 offset: 0x[0-9a-f]+, L2 index: 0x1\)/);
  await again.close().catch(() => undefined);
  // The write path judges every entry the request touches before it writes anything.
  const writer = await Qcow2Device.open(twin, { onCorruption: (e) => events.push(e.message) });
  await assert.rejects(writer.write(0, new Uint8Array(3 * CLUSTER).fill(2)));
  assert.match(events[1] ?? '', /Invalid cluster entry found \(L2 offset: 0x[0-9a-f]+, L2 index: 0x1\)/);
  await writer.close().catch(() => undefined);
  const check = await Qcow2Device.open(twin, { readOnly: true });
  await expectBytes(check, 0, new Uint8Array(512).fill(1));
  await check.close();
});

test('copy-on-write of a shared cluster copies from the first allocated subcluster to the last', async () => {
  const { store, dev } = await fresh();
  // Subcluster 7 zero, 13 and 18 allocated, the rest unallocated.
  await dev.writeZeroes(14 * KiB, SUB, { mayUnmap: false });
  await dev.write(26 * KiB, new Uint8Array(SUB).fill(0xd0));
  await dev.write(36 * KiB, new Uint8Array(SUB).fill(0xe0));
  await dev.createSnapshot('snap');
  await dev.write(40 * KiB, new Uint8Array(KiB).fill(0xf2));
  await dev.flush();
  const e = await entry(store, 0);
  assert.deepEqual(e.alloc, range(13, 20));
  assert.deepEqual(e.zero, [7]);
  const want = new Uint8Array(CLUSTER);
  want.fill(0xd0, 26 * KiB, 28 * KiB).fill(0xe0, 36 * KiB, 38 * KiB).fill(0xf2, 40 * KiB, 41 * KiB);
  await expectBytes(dev, 0, want);
  await dev.close();
});
