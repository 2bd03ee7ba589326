/**
 * blockStatus walks sparse tables by skipping runs of zero bytes rather than decoding entry by
 * entry. These tests hold it to the entry-by-entry answer: for any sub-range, at any alignment,
 * each byte's state is the one its own cluster's entry gives.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockExtent } from '../../core/block-device.js';
import { MemoryStore } from '../../storage/memory.js';
import { createQcow2 } from './create.js';
import { Qcow2Device } from './qcow2.js';

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
