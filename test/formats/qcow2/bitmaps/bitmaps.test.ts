/**
 * The bitmap codecs and their limits: directory round trips, hostile directories and tables
 * (each one QCOW_CORRUPT, never a large allocation), bit runs and the pending range set.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setU16, setU32, setU64 } from '#src/core/bytes.js';
import { MemoryStore } from '#src/storage/memory.js';
import { FLAG_AUTO, FLAG_IN_USE, decodeDirectory, encodeDirectory, tableSizeFor, unusableReason, type BitmapEntry } from '#src/formats/qcow2/bitmaps/directory.js';
import { ALL_ONE, ALL_ZERO, decodeTable, encodeTable } from '#src/formats/qcow2/bitmaps/table.js';
import { bitRuns, setBits } from '#src/formats/qcow2/bitmaps/bits.js';
import { RangeSet } from '#src/formats/qcow2/bitmaps/ranges.js';
import { PersistentBitmaps } from '#src/formats/qcow2/bitmaps/persistent.js';

const entry = (name: string, over: Partial<BitmapEntry> = {}): BitmapEntry => ({
  tableOffset: 0x30000,
  tableSize: 1,
  flags: FLAG_AUTO,
  type: 1,
  granularityBits: 16,
  name,
  extraData: new Uint8Array(0),
  ...over,
});

const isCorrupt = (e: unknown) => (e as { code?: string }).code === 'QCOW_CORRUPT';

test('directory entries round trip, names and extra data included, padded to 8', () => {
  const list = [entry('a'), entry('bitmap-ü', { extraData: new Uint8Array([1, 2, 3]), flags: 4 })];
  const bytes = encodeDirectory(list);
  assert.equal(bytes.length % 8, 0);
  assert.deepEqual(decodeDirectory(bytes, 2), list);
});

test('hostile directories: overruns, name lengths, duplicates, counts, trailing bytes', () => {
  const good = encodeDirectory([entry('a'), entry('b')]);
  assert.throws(() => decodeDirectory(good, 3), isCorrupt);
  assert.throws(() => decodeDirectory(good.subarray(0, 40), 2), isCorrupt);
  assert.throws(() => decodeDirectory(encodeDirectory([entry('a'), entry('a')]), 2), isCorrupt);
  assert.throws(() => decodeDirectory(good, 1), isCorrupt); // bytes left over
  assert.throws(() => decodeDirectory(good, 70000), isCorrupt);
  const zeroName = good.slice();
  setU16(zeroName, 18, 0);
  assert.throws(() => decodeDirectory(zeroName, 2), isCorrupt);
  const hugeExtra = good.slice();
  setU32(hugeExtra, 20, 0xffffffff);
  assert.throws(() => decodeDirectory(hugeExtra, 2), isCorrupt);
});

test('unusable entries are named, in_use ones included', () => {
  const g = { clusterSize: 65536, size: 1 << 30, fileSize: 1 << 20 };
  assert.equal(unusableReason(entry('a'), g), undefined);
  assert.match(unusableReason(entry('a', { flags: FLAG_IN_USE }), g)!, /inconsistent/);
  assert.match(unusableReason(entry('a', { granularityBits: 40 }), g)!, /granularity/);
  assert.match(unusableReason(entry('a', { tableOffset: 1 << 30 }), g)!, /table offset/);
  assert.match(unusableReason(entry('a', { tableSize: 0x10000000 }), g)!, /table size/);
  assert.match(unusableReason(entry('a', { type: 2 }), g)!, /type/);
  assert.match(unusableReason(entry('a', { extraData: new Uint8Array(8) }), g)!, /extra data/);
  // 4 TiB at 64 KiB granularity: 8 MiB of bitmap, 128 table entries of 64 KiB clusters.
  assert.equal(tableSizeFor(4 * 2 ** 40, 16, 65536), 128);
});

test('table entries: all-zero, all-one, offsets; reserved bits and bad offsets refused', () => {
  const t = new Float64Array([ALL_ZERO, ALL_ONE, 0x20000]);
  assert.deepEqual(decodeTable(encodeTable(t), 65536, 0x40000, 'x'), t);
  const bad = new Uint8Array(8);
  setU64(bad, 0, 0x20001);
  assert.throws(() => decodeTable(bad, 65536, 0x40000, 'x'), isCorrupt);
  setU64(bad, 0, 2);
  assert.throws(() => decodeTable(bad, 65536, 0x40000, 'x'), isCorrupt);
  setU64(bad, 0, 0x80000);
  assert.throws(() => decodeTable(bad, 65536, 0x40000, 'x'), isCorrupt);
});

test('bits are least significant first, runs merge whole bytes', () => {
  const b = new Uint8Array(4);
  setBits(b, 3, 21);
  assert.deepEqual([...b], [0xf8, 0xff, 0x1f, 0]);
  assert.deepEqual([...bitRuns(b, 0, 32)], [
    [0, 3, false],
    [3, 21, true],
    [21, 32, false],
  ]);
});

test('pending ranges merge overlapping and touching writes', () => {
  const r = new RangeSet();
  r.add(10, 20);
  r.add(30, 40);
  r.add(20, 25);
  r.add(0, 5);
  r.add(24, 31);
  assert.deepEqual(r.take(), [
    [0, 5],
    [10, 40],
  ]);
  assert.equal(r.count, 0);
});

test('a hostile bitmaps extension is one clean error, not an allocation of its claimed size', async () => {
  const store = new MemoryStore(new Uint8Array(1 << 20));
  const host = { store, clusterSize: 65536, size: 1 << 30, fileSize: () => 1 << 20 };
  const ext = (over: object) => ({ nbBitmaps: 1, directorySize: 24, directoryOffset: 65536, ...over });
  for (const bad of [ext({ nbBitmaps: 0 }), ext({ nbBitmaps: 1e6 }), ext({ directorySize: 2 ** 40 }), ext({ directoryOffset: 2 ** 50 }), ext({ directoryOffset: 100 }), ext({ directorySize: 8 })]) {
    await assert.rejects(PersistentBitmaps.load(host, bad, true), isCorrupt, JSON.stringify(bad));
  }
  // Autoclear bit clear: stale, ignored whatever it says.
  assert.deepEqual((await PersistentBitmaps.load(host, ext({ nbBitmaps: 1e6 }), false)).list(), []);
});
