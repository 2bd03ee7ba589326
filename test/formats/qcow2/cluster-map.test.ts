/**
 * The read fast path (ClusterMap.mappedHostRun) decodes only a request's first L2 entry and
 * compares the others with it as raw words. These tests hold it to the general path: it answers
 * only for runs of normal clusters that follow each other in the file with the same flags, every
 * read returns the bytes written, and a run whose end lies past the file still fails as corrupt.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { l1TableOffset } from '#src/formats/qcow2/l1-entry.js';
import { setL2Entry, standardL2Entry } from '#src/formats/qcow2/l2-entry.js';
import { QcowError } from '#src/core/errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 4 * KiB;
const SIZE = 8 * MiB;

/**
 * 4 KiB clusters: 0-15 written in order (one host run), cluster 8 then zeroed in place (host
 * cluster kept: its entry differs from its neighbours' only in the zero flag), 20-23 written last
 * to first (neighbours in the table, not in the file). Returns the image and the guest content.
 */
async function image(): Promise<{ bytes: Uint8Array; model: Uint8Array }> {
  const store = new MemoryStore(undefined, { name: 'runs.qcow2' });
  await createQcow2(store, { size: SIZE, options: { cluster_size: String(CLUSTER) } });
  const dev = await Qcow2Device.open(store, {});
  const model = new Uint8Array(SIZE);
  const put = async (c: number) => {
    const data = new Uint8Array(CLUSTER);
    for (let i = 0; i < CLUSTER; i++) data[i] = (c * 31 + i) & 0xff;
    await dev.write(c * CLUSTER, data);
    model.set(data, c * CLUSTER);
  };
  for (let c = 0; c < 16; c++) await put(c);
  for (let c = 23; c >= 20; c--) await put(c);
  await dev.writeZeroes(8 * CLUSTER, CLUSTER, { mayUnmap: false });
  model.fill(0, 8 * CLUSTER, 9 * CLUSTER);
  await dev.close();
  return { bytes: store.bytes(), model };
}

const openReadOnly = (bytes: Uint8Array) => Qcow2Device.open(new MemoryStore(bytes, { readOnly: true }), { readOnly: true });

test('mappedHostRun answers only runs of normal clusters that follow each other in the file', async () => {
  const { bytes } = await image();
  const dev = await openReadOnly(bytes);
  // The table must be cached for the fast path: the first read loads it.
  await dev.read(0, new Uint8Array(512));
  const host0 = dev.map.mappedHostRun(0, CLUSTER);
  assert.ok(host0 > 0);
  // Clusters 0-7 follow each other in the file: any range inside them is one host run.
  assert.equal(dev.map.mappedHostRun(100, 8 * CLUSTER - 100), host0 + 100);
  assert.equal(dev.map.mappedHostRun(3 * CLUSTER + 7, 2 * CLUSTER), host0 + 3 * CLUSTER + 7);
  // Cluster 8 is zeroed in place (same host offset, zero flag set): the general path decides.
  assert.equal(dev.map.mappedHostRun(0, 9 * CLUSTER), -1);
  assert.equal(dev.map.mappedHostRun(8 * CLUSTER, 1), -1);
  assert.equal(dev.map.mappedHostRun(9 * CLUSTER, 7 * CLUSTER), host0 + 9 * CLUSTER);
  // 20-23 are neighbours in the table but not in the file; each alone is a run.
  assert.equal(dev.map.mappedHostRun(20 * CLUSTER, 2 * CLUSTER), -1);
  assert.ok(dev.map.mappedHostRun(21 * CLUSTER + 5, 100) > 0);
  // Unallocated clusters after the run.
  assert.equal(dev.map.mappedHostRun(15 * CLUSTER, 2 * CLUSTER), -1);
  await dev.close();
});

test('reads of any range return what was written, through either path', async () => {
  const { bytes, model } = await image();
  const dev = await openReadOnly(bytes);
  let seed = 11;
  const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
  for (let i = 0; i < 400; i++) {
    const start = rand(26 * CLUSTER);
    const length = 1 + rand(Math.min(10 * CLUSTER, SIZE - start));
    const got = new Uint8Array(length);
    await dev.read(start, got);
    assert.deepEqual(got, model.subarray(start, start + length), `read of [${start}, +${length})`);
  }
  await dev.close();
});

test('a host run whose last cluster lies past the end of the file is corrupt, not read', async () => {
  const { bytes } = await image();
  const probe = await openReadOnly(bytes);
  const l2 = l1TableOffset(probe.map.l1, 0);
  await probe.close();
  // Clusters 14 and 15 made to follow each other across the end of the file.
  const patched = bytes.slice();
  const table = patched.subarray(l2, l2 + CLUSTER);
  setL2Entry(table, 14, 8, standardL2Entry(patched.length - CLUSTER, { copied: true }));
  setL2Entry(table, 15, 8, standardL2Entry(patched.length, { copied: true }));
  const dev = await openReadOnly(patched);
  await dev.read(0, new Uint8Array(512));
  assert.equal(dev.map.mappedHostRun(14 * CLUSTER, 2 * CLUSTER), -1);
  // Cluster 14 alone is inside the file.
  assert.equal(dev.map.mappedHostRun(14 * CLUSTER, CLUSTER), patched.length - CLUSTER);
  await assert.rejects(
    dev.read(14 * CLUSTER, new Uint8Array(2 * CLUSTER)),
    (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT' && /beyond the end of the file/.test(e.message),
  );
  await dev.close();
});

test('the overlap guard still refuses an L2 table made late, above the data, whose count was zeroed', async () => {
  // 4 KiB clusters: one L2 table maps 2 MiB. The table for 10 MiB is made after the first 2 MiB of
  // data, so it lies above them; the guard's per-cluster look is skipped only above every table.
  const store = new MemoryStore(undefined, { name: 'late-l2.qcow2' });
  await createQcow2(store, { size: SIZE * 4, options: { cluster_size: String(CLUSTER) } });
  let dev = await Qcow2Device.open(store, {});
  await dev.write(0, new Uint8Array(2 * MiB).fill(1));
  await dev.write(10 * MiB, new Uint8Array(CLUSTER).fill(2));
  await dev.close();
  const bytes = store.bytes();
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const l1 = Number(view.getBigUint64(40));
  const lateTable = l1TableOffset(bytes, l1 / 8 + 5);
  assert.ok(lateTable > 2 * MiB, `the late table lies above the data (${lateTable})`);
  // Its refcount (16-bit, in the first refcount block) goes to zero by hand.
  const refTable = Number(view.getBigUint64(48));
  const block = Number(view.getBigUint64(refTable));
  view.setUint16(block + (lateTable / CLUSTER) * 2, 0);
  dev = await Qcow2Device.open(new MemoryStore(bytes, { name: 'late-l2.qcow2' }), {});
  await assert.rejects(dev.write(20 * MiB, new Uint8Array(CLUSTER).fill(3)), /active L2 table/);
});
