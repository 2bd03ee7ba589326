/**
 * blockStatus walks sparse tables by skipping runs of zero bytes rather than decoding entry by
 * entry. These tests hold it to the entry-by-entry answer: for any sub-range, at any alignment,
 * each byte's state is the one its own cluster's entry gives.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockExtent } from '#src/core/block-device.js';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** An image with data, zeroed and untouched clusters spread over several L2 tables. */
async function sparseImage(options: Record<string, string>, size: number): Promise<MemoryStore> {
  const store = new MemoryStore(undefined, { name: 'sparse.qcow2' });
  await createQcow2(store, { size, options });
  const dev = await Qcow2Device.open(store, {});
  const cluster = dev.clusterSize;
  const coverage = dev.geometry.l2Coverage;
  const data = new Uint8Array(cluster).fill(0x5a);
  // Clusters at the start and end of tables, in the middle, neighbours, and a zeroed one.
  for (const at of [0, cluster, 7 * cluster, coverage - cluster, 2 * coverage + 3 * cluster, size - cluster]) await dev.write(at, data);
  // Neighbours in the table that are not neighbours in the file (written last to first).
  for (const at of [5 * cluster, 4 * cluster, 3 * cluster]) await dev.write(at, data);
  await dev.writeZeroes(2 * coverage + 5 * cluster, cluster, { mayUnmap: false });
  await dev.close();
  return store;
}

/** The state of one byte, from an extent list. */
function stateAt(list: BlockExtent[], offset: number): string {
  const e = list.find((x) => x.offset <= offset && offset < x.offset + x.length);
  assert.ok(e, `no extent covers ${offset}`);
  return `${e.allocated}/${e.zero}/${e.data}/${e.hostOffset === undefined ? '-' : e.hostOffset + (offset - e.offset)}`;
}

const OPTION_SETS: Record<string, string>[] = [{ cluster_size: '4k' }, { cluster_size: '16k', extended_l2: 'on' }, { cluster_size: '512' }];
for (const options of OPTION_SETS) {
  test(`blockStatus of any sub-range matches the cluster-by-cluster status (${JSON.stringify(options)})`, async () => {
    const size = 64 * MiB;
    const store = await sparseImage(options, size);
    const dev = await Qcow2Device.open(new MemoryStore(store.bytes(), { readOnly: true }), { readOnly: true });
    const cluster = dev.clusterSize;
    // The reference: one call per cluster, each answered from that cluster's entry alone.
    const probes: number[] = [];
    const coverage = dev.geometry.l2Coverage;
    for (const base of [0, coverage - 2 * cluster, 2 * coverage, size - 2 * cluster]) {
      for (let k = 0; k < 10 * cluster && base + k < size; k += cluster / 2) probes.push(base + k);
    }
    const truth = new Map<number, string>();
    for (const p of probes) truth.set(p, stateAt(await dev.blockStatus(p, 1), p));

    let seed = 7;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    for (let i = 0; i < 200; i++) {
      // Half the ranges start near the interesting clusters, half anywhere.
      const start = i % 2 ? Math.max(0, probes[rand(probes.length)]! - rand(4 * cluster)) : rand(size - 1);
      // Short ranges, ranges to the end of the disk (across many empty tables), and in between.
      const length = i % 3 === 0 ? 1 + rand(Math.min(size - start, 8 * cluster)) : i % 3 === 1 ? size - start : 1 + rand(size - start);
      const list = await dev.blockStatus(start, length);
      assert.equal(list[0]!.offset, start);
      assert.equal(list.reduce((n, e) => n + e.length, 0), length, 'the extents cover the range exactly');
      for (const p of probes) if (p >= start && p < start + length) assert.equal(stateAt(list, p), truth.get(p), `offset ${p} in [${start}, +${length})`);
    }
    await dev.close();
  });
}

test('an L1 entry with flag bits but no table offset counts as empty, and the walk goes on past it', async () => {
  const size = 64 * MiB;
  const bytes = (await sparseImage({ cluster_size: '4k' }, size)).bytes();
  const plain = await Qcow2Device.open(new MemoryStore(bytes.slice(), { readOnly: true }), { readOnly: true });
  const { l2Coverage: coverage } = plain.geometry;
  const cluster = plain.clusterSize;
  const expected = await plain.blockStatus(coverage, 2 * coverage);
  // Table 1 is empty and table 2 has data 3 clusters in: one unallocated run up to there.
  assert.deepEqual([expected[0]!.offset, expected[0]!.length, expected[0]!.allocated], [coverage, coverage + 3 * cluster, false]);
  // L1 entry 1 gets the COPIED flag alone: it still names no L2 table.
  bytes[plain.header.l1TableOffset + 8] = 0x80;
  await plain.close();
  const flagged = await Qcow2Device.open(new MemoryStore(bytes, { readOnly: true }), { readOnly: true });
  assert.deepEqual(await flagged.blockStatus(coverage, 2 * coverage), expected);
  await flagged.close();
});

test('host runs are followed across the 2^31 and 2^32 byte marks of the file, and broken where only the low word runs on', async (t) => {
  const { scratch } = await import('../../support/qemu.js');
  const { FileStore } = await import('#src/storage/file.node.js');
  const { join } = await import('node:path');
  const path = join(await scratch(t), 'far.qcow2');
  const store = await FileStore.open(path, { create: true });
  await createQcow2(store, { size: 64 * MiB, options: { cluster_size: '4k' } });
  const dev = await Qcow2Device.open(store, {});
  await dev.write(0, new Uint8Array(4 * KiB).fill(1)); // gives guest range 0 an L2 table
  const l1Offset = dev.header.l1TableOffset;
  await dev.close();
  // Table entries, COPIED normal clusters: 16 running over 2^31, 16 running over 2^32, then 16
  // whose low word runs on over 2^32 but whose high word does not follow (not contiguous there).
  const table = new DataView(new ArrayBuffer(48 * 8));
  const put = (i: number, host: number) => table.setBigUint64(i * 8, (1n << 63n) | BigInt(host));
  for (let k = 0; k < 16; k++) put(k, 2 ** 31 - 8 * 4096 + k * 4096);
  for (let k = 0; k < 16; k++) put(16 + k, 2 ** 32 - 8 * 4096 + k * 4096);
  for (let k = 0; k < 16; k++) put(32 + k, k < 8 ? 2 ** 33 - 8 * 4096 + k * 4096 : 2 ** 32 + (k - 8) * 4096);
  const rw = await FileStore.open(path, {});
  const l2 = Number(new DataView((await readAt(rw, l1Offset, 8)).buffer).getBigUint64(0) & 0x00fffffffffffe00n);
  assert.ok(l2 > 0);
  await rw.write(l2, new Uint8Array(table.buffer));
  await rw.truncate(2 ** 33 + 64 * KiB); // sparse: every named host offset lies inside the file
  await rw.close();

  const ro = await Qcow2Device.open(await FileStore.open(path, { readOnly: true }), { readOnly: true });
  try {
    const runs = (await ro.blockStatus(0, 48 * 4 * KiB)).map((e) => [e.offset / (4 * KiB), e.length / (4 * KiB), e.hostOffset]);
    assert.deepEqual(runs, [
      [0, 16, 2 ** 31 - 8 * 4096],
      [16, 16, 2 ** 32 - 8 * 4096],
      [32, 8, 2 ** 33 - 8 * 4096],
      [40, 8, 2 ** 32],
    ]);
  } finally {
    await ro.close();
  }
});

async function readAt(store: { read(o: number, b: Uint8Array): Promise<number> }, offset: number, n: number): Promise<Uint8Array> {
  const b = new Uint8Array(n);
  await store.read(offset, b);
  return b;
}
