/**
 * Guest writes at queue depth > 1: most are done in one synchronous step (no lock turn), the
 * others wait in batches for the lock. These tests hold the two paths to the order the callers
 * gave: clusters are allocated in call order (a convert's layout is guest order), a flush or a
 * zero write is not overtaken by writes issued after it, and every write's data reads back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;

async function fresh(size = 64 * 1024 * KiB): Promise<{ store: MemoryStore; dev: Qcow2Device }> {
  const store = new MemoryStore(undefined, { name: 'queue.qcow2' });
  await createQcow2(store, { size, options: {} });
  return { store, dev: await Qcow2Device.open(store, {}) };
}

/** Host offset of each guest cluster in [0, n) (undefined where unallocated). */
async function hostOffsets(dev: Qcow2Device, n: number): Promise<Array<number | undefined>> {
  const out: Array<number | undefined> = [];
  for (const e of await dev.blockStatus(0, n * CLUSTER)) {
    for (let o = e.offset; o < e.offset + e.length; o += CLUSTER) out.push(e.hostOffset === undefined ? undefined : e.hostOffset + (o - e.offset));
  }
  return out;
}

test('writes issued together allocate in call order: the first one waits for its L2 table, the rest neither overtake it nor each other', async () => {
  const { store, dev } = await fresh();
  const n = 64;
  const writes: Promise<void>[] = [];
  for (let i = 0; i < n; i++) writes.push(dev.write(i * CLUSTER, new Uint8Array(CLUSTER).fill(i + 1)));
  // More while the first ones are queued, and after (the synchronous path), in guest order.
  await Promise.resolve();
  for (let i = n; i < 2 * n; i++) writes.push(dev.write(i * CLUSTER, new Uint8Array(CLUSTER).fill(i + 1)));
  await Promise.all(writes);
  const hosts = await hostOffsets(dev, 2 * n);
  for (let i = 1; i < 2 * n; i++) assert.equal(hosts[i], hosts[0]! + i * CLUSTER, `cluster ${i}`);
  const back = new Uint8Array(CLUSTER);
  for (let i = 0; i < 2 * n; i++) {
    await dev.read(i * CLUSTER, back);
    assert.ok(back.every((b) => b === i + 1), `cluster ${i} reads back`);
  }
  await dev.close();
  // Reopened: what reached the store is the same.
  const again = await Qcow2Device.open(store, { readOnly: true });
  await again.read((2 * n - 1) * CLUSTER, back);
  assert.ok(back.every((b) => b === 2 * n));
  await again.close();
});

test('a zero write issued between writes to the same cluster keeps its place', async () => {
  const { dev } = await fresh();
  // The first write waits for its table; the zero write and the last write queue behind it.
  const a = dev.write(0, new Uint8Array(CLUSTER).fill(1));
  const z = dev.writeZeroes(0, CLUSTER, {});
  const b = dev.write(4 * KiB, new Uint8Array(4 * KiB).fill(2));
  await Promise.all([a, z, b]);
  const back = new Uint8Array(CLUSTER);
  await dev.read(0, back);
  assert.ok(back.subarray(0, 4 * KiB).every((x) => x === 0), 'zeroed before the last write');
  assert.ok(back.subarray(4 * KiB, 8 * KiB).every((x) => x === 2), 'the last write lands after the zeroing');
  assert.ok(back.subarray(8 * KiB).every((x) => x === 0));
  await dev.close();
});

test('writes issued after a flush wait for it; the flush covers the writes before it', async () => {
  const { store, dev } = await fresh();
  await dev.write(0, new Uint8Array(CLUSTER).fill(1)); // the table is cached: the next writes may take the synchronous path
  const events: string[] = [];
  const write = store.write.bind(store);
  const flush = store.flush.bind(store);
  store.write = async (offset: number, data: Uint8Array) => {
    if (data.length === CLUSTER && data[0] !== 0) events.push(`data ${data[0]}`);
    await write(offset, data);
  };
  store.flush = async () => {
    events.push('flush');
    await flush();
  };
  const before = dev.write(CLUSTER, new Uint8Array(CLUSTER).fill(2));
  const flushing = dev.flush();
  const after = dev.write(2 * CLUSTER, new Uint8Array(CLUSTER).fill(3));
  await Promise.all([before, flushing, after]);
  const first = events.indexOf('flush');
  assert.ok(events.indexOf('data 2') < first, events.join(', '));
  assert.ok(events.indexOf('data 3') > first, events.join(', '));
  await dev.close();
  const again = await Qcow2Device.open(store, { readOnly: true });
  const back = new Uint8Array(CLUSTER);
  for (const [i, v] of [[0, 1], [1, 2], [2, 3]] as const) {
    await again.read(i * CLUSTER, back);
    assert.ok(back.every((x) => x === v), `cluster ${i}`);
  }
  await again.close();
});
