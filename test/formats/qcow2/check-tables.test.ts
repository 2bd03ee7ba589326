/**
 * check walks its tables skipping the entries that are all zeros (formats/qcow2/check.ts,
 * nextEntry). These tests plant entries with a single bit set, in any byte of the entry and at
 * the table's ends, between runs of zeros: each must still be seen and reported.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { scratch } from '../../support/qemu.js';
import { createImage, openImage } from '#src/node.js';
import { MemoryStore } from '#src/storage/memory.js';
import { checkQcow2 } from '#src/formats/qcow2/check.js';

/** A 1 MiB qcow2 image of 4 KiB clusters (or 16 KiB with extended L2), its first 64 KiB written. */
async function image(t: Parameters<typeof scratch>[0], extendedL2 = false): Promise<Uint8Array> {
  const file = join(await scratch(t), 'c.qcow2');
  await createImage(file, { format: 'qcow2', size: 1 << 20, options: extendedL2 ? { cluster_size: '16k', extended_l2: 'on' } : { cluster_size: '4k' } });
  const dev = await openImage(file, { format: 'qcow2' });
  try {
    await dev.write(0, new Uint8Array(64 * 1024).fill(7));
  } finally {
    await dev.close();
  }
  return new Uint8Array(await readFile(file));
}

const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
/** Where the active L1 table's first entry points: the only L2 table of these images. */
const firstL2 = (b: Uint8Array) => Number(dv(b).getBigUint64(Number(dv(b).getBigUint64(40))) & 0x00fffffffffffe00n);

test('check sees a lone reserved bit in any byte of an L2 entry, at either end of the table and between zeros', async (t) => {
  const clean = await image(t);
  const base = await checkQcow2(new MemoryStore(clean.slice()));
  assert.equal(base.corruptions, 0);
  assert.equal(base.allocatedClusters, 16);
  const l2 = firstL2(clean);
  // Entries 0-15 map the data; 16 follows the run, 511 is the last of a 4 KiB table. Each byte
  // holds reserved bits (bits 56-61 and 1-8): one per planted entry, no offset, nothing else.
  const planted: Array<[entry: number, byte: number, value: number]> = [
    [16, 0, 0x01],
    [17, 7, 0x02],
    [64, 6, 0x01],
    [300, 0, 0x20],
    [511, 7, 0x80],
  ];
  const bytes = clean.slice();
  for (const [e, k, v] of planted) bytes[l2 + e * 8 + k] = v;
  const r = await checkQcow2(new MemoryStore(bytes));
  const expected = planted.map(([, k, v]) => `ERROR found l2 entry with reserved bits set: ${(BigInt(v) << BigInt(8 * (7 - k))).toString(16)}`);
  assert.deepEqual(
    r.messages.filter((m) => m.includes('reserved bits')),
    expected,
  );
  assert.equal(r.corruptions, planted.length);
  assert.equal(r.allocatedClusters, 16);
});

test('check sees an extended L2 entry whose only bit set is in its allocation bitmap, in the last entry too', async (t) => {
  const clean = await image(t, true);
  assert.equal((await checkQcow2(new MemoryStore(clean.slice()))).corruptions, 0);
  const l2 = firstL2(clean);
  const entries = 16384 / 16;
  const bytes = clean.slice();
  // A 1 MiB image of 16 KiB clusters uses 64 entries; the table has 1024. Bytes 12-15 are the
  // allocation bitmap: set without an offset, the entry is an error.
  for (const [e, k] of [
    [64, 15],
    [500, 12],
    [entries - 1, 13],
  ] as const)
    bytes[l2 + e * 16 + k] = 0x10;
  const r = await checkQcow2(new MemoryStore(bytes));
  assert.deepEqual(
    r.messages.filter((m) => m.includes('subcluster allocation map')),
    Array(3).fill('ERROR: Unallocated cluster has non-zero subcluster allocation map'),
  );
  assert.equal(r.corruptions, 3);
});

test('check sees a lone reserved bit in the last refcount table entry', async (t) => {
  const bytes = await image(t);
  const table = Number(dv(bytes).getBigUint64(48));
  const entries = (dv(bytes).getUint32(56) * 4096) / 8;
  bytes[table + (entries - 1) * 8 + 7] = 0x01;
  const r = await checkQcow2(new MemoryStore(bytes));
  assert.ok(r.messages.includes(`ERROR refcount table entry ${entries - 1} has reserved bits set`), r.messages.join('\n'));
});

test('check compares COPIED with the stored counts entry by entry inside long runs of contiguous entries, and repairs them', async (t) => {
  // 128 clusters of 4 KiB written in one go: one run of entries 0-127, longer than the runs the
  // walk keeps for the COPIED check (check.ts, MIN_KEPT_RUN), in one refcount block.
  const file = join(await scratch(t), 'runs.qcow2');
  await createImage(file, { format: 'qcow2', size: 1 << 20, options: { cluster_size: '4k' } });
  const dev = await openImage(file, { format: 'qcow2' });
  try {
    await dev.write(0, new Uint8Array(128 * 4096).fill(9));
  } finally {
    await dev.close();
  }
  const bytes = new Uint8Array(await readFile(file));
  const clean = await checkQcow2(new MemoryStore(bytes.slice()));
  assert.deepEqual([clean.corruptions, clean.leaks, clean.allocatedClusters], [0, 0, 128]);
  const l2 = firstL2(bytes);
  // COPIED cleared on entries 70 and 127 (inside and at the end of the run), and the count of
  // entry 90's cluster raised to 2: a leak, and its COPIED flag now wrong.
  for (const e of [70, 127]) bytes[l2 + e * 8]! &= 0x7f;
  const cluster90 = Number(dv(bytes).getBigUint64(l2 + 90 * 8) & 0x00fffffffffffe00n) / 4096;
  const block = Number(dv(bytes).getBigUint64(Number(dv(bytes).getBigUint64(48))));
  dv(bytes).setUint16(block + 2 * cluster90, 2);
  const r = await checkQcow2(new MemoryStore(bytes.slice()));
  assert.equal(r.corruptions, 3);
  assert.equal(r.leaks, 1);
  assert.deepEqual(
    r.messages.filter((m) => m.includes('OFLAG_COPIED')).map((m) => m.replace(/ l2_entry=\w+/, '')),
    ['ERROR OFLAG_COPIED data cluster: refcount=1', 'ERROR OFLAG_COPIED data cluster: refcount=2', 'ERROR OFLAG_COPIED data cluster: refcount=1'],
  );
  const store = new MemoryStore(bytes.slice());
  const fixed = await checkQcow2(store, { repair: 'all' });
  // As qemu-img -r all: the leak is repaired first, after which entry 90's COPIED flag is right.
  assert.deepEqual([fixed.corruptions, fixed.leaks, fixed.corruptionsFixed, fixed.leaksFixed], [0, 0, 2, 1]);
  const again = await checkQcow2(store);
  assert.deepEqual([again.corruptions, again.leaks, again.allocatedClusters], [0, 0, 128]);
});
