import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { FileSpace } from '#src/formats/qcow1/file-space.js';

const CLUSTER = 4096;

test('clusters are taken at the cluster-aligned end; the padding skipped after compressed bytes holds later compressed clusters', async () => {
  const store = new MemoryStore(undefined, { name: 'space.qcow' });
  const space = new FileSpace(store, CLUSTER, CLUSTER);
  assert.equal(space.takeAligned(CLUSTER), CLUSTER, 'at the end of the file');
  const packed = await space.appendCompressed(new Uint8Array(700).fill(7));
  assert.equal(packed, 2 * CLUSTER, 'compressed bytes follow the last byte on a sector boundary');
  assert.equal(space.end, 2 * CLUSTER + 700);
  // The next cluster skips [2*CLUSTER+1024, 3*CLUSTER): that gap takes compressed clusters.
  assert.equal(space.takeAligned(CLUSTER), 3 * CLUSTER);
  assert.equal(space.takeGap(3000), 2 * CLUSTER + 1024);
  assert.equal(space.takeGap(100), undefined, 'the gap is used up (sector granularity)');
  // A file whose end is not aligned leaves a gap too: [1024, 4096) after a 1000-byte header.
  space.reset(1000);
  assert.equal(space.takeAligned(CLUSTER), CLUSTER);
  assert.equal(space.takeGap(512), 1024);
});

test('compressed bytes wait in memory, read back from there, and reach the file at writeTail', async () => {
  const store = new MemoryStore(undefined, { name: 'space.qcow' });
  const space = new FileSpace(store, 0, CLUSTER);
  const a = await space.appendCompressed(new Uint8Array(300).fill(1));
  const b = await space.appendCompressed(new Uint8Array(200).fill(2));
  assert.deepEqual([a, b], [0, 512]);
  assert.equal(await store.size(), 0, 'nothing written yet');
  const back = new Uint8Array(200);
  assert.ok(space.readTail(b, back));
  assert.deepEqual(back, new Uint8Array(200).fill(2));
  assert.equal(space.readTail(b + 100, new Uint8Array(200)), false, 'past the tail: read the file instead');
  await space.writeTail();
  assert.equal(space.readTail(b, back), false);
  const file = new Uint8Array(712);
  await store.read(0, file);
  assert.deepEqual(file.subarray(0, 300), new Uint8Array(300).fill(1));
  assert.deepEqual(file.subarray(512, 712), new Uint8Array(200).fill(2));
});
