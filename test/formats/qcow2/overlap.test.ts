/**
 * The overlap guard (src/formats/qcow2/overlap.ts): which structure a range overlaps, in QEMU's
 * order of names; the spans follow the structures when they move; and an allocator with the guard
 * refuses a metadata cluster whose count was zeroed, where it used to hand it out.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MetadataOverlap, overlapMask, vetAllocation, OVERLAP_NAMES, type OverlapSources } from '#src/formats/qcow2/overlap.js';
import type { Qcow2Header } from '#src/formats/qcow2/header.js';
import type { Qcow2Snapshot } from '#src/formats/qcow2/snapshot-table.js';
import { Refcounts } from '#src/formats/qcow2/alloc.js';
import { MemoryStore } from '#src/storage/memory.js';
import { CorruptionEvent, QcowError } from '#src/core/errors.js';

const CS = 65536;

function sources(over: { header?: Partial<Qcow2Header>; l2?: number[]; blocks?: number[]; snaps?: Qcow2Snapshot[] } = {}) {
  const header = { l1TableOffset: 3 * CS, snapshotsOffset: 0, ...over.header } as Qcow2Header;
  const state = { header, l2: new Set(over.l2 ?? [4]), blocks: new Set(over.blocks ?? [2]), snaps: over.snaps ?? [], table: { offset: CS, clusters: 1 } };
  const src: OverlapSources = {
    clusterSize: CS,
    header: () => state.header,
    l1Entries: () => 1,
    isL2Table: (c) => state.l2.has(c),
    refcountTable: () => state.table,
    isRefcountBlock: (c) => state.blocks.has(c),
    snapshots: () => state.snaps,
  };
  return { state, src };
}

test('each structure is named as QEMU names it, the first in its order when several overlap', () => {
  const snap = { l1TableOffset: 8 * CS, l1Size: 1, id: '1', name: 'a', extraUnknown: new Uint8Array(0) } as unknown as Qcow2Snapshot;
  const { src } = sources({ header: { snapshotsOffset: 7 * CS, bitmaps: { nbBitmaps: 1, directorySize: 100, directoryOffset: 9 * CS } }, snaps: [snap] });
  const o = new MetadataOverlap(src);
  assert.equal(o.check(0, 512), 'qcow2_header');
  assert.equal(o.check(CS + 100, 1), 'refcount table');
  assert.equal(o.check(2 * CS, CS), 'refcount block');
  assert.equal(o.check(3 * CS, CS), 'active L1 table');
  assert.equal(o.check(4 * CS, CS), 'active L2 table');
  assert.equal(o.check(7 * CS, CS), 'snapshot table');
  assert.equal(o.check(8 * CS, CS), 'inactive L1 table');
  assert.equal(o.check(9 * CS, CS), 'bitmap directory');
  assert.equal(o.check(5 * CS, 2 * CS), undefined);
  assert.equal(o.check(10 * CS, 100 * CS), undefined);
  // Whole clusters are compared, and the most important structure is named.
  assert.equal(o.check(2 * CS + 10, 2 * CS), 'active L1 table');
  assert.equal(o.check(0, 10 * CS), 'qcow2_header');
  assert.equal(o.check(2 * CS, 3 * CS), 'active L1 table');
  assert.equal(o.check(4 * CS - 1, 2), 'active L1 table');
});

test('the spans follow a structure that moved', () => {
  const { state, src } = sources();
  const o = new MetadataOverlap(src);
  assert.equal(o.check(20 * CS, CS), undefined);
  state.table = { offset: 20 * CS, clusters: 2 };
  assert.equal(o.check(21 * CS, CS), 'refcount table');
  assert.equal(o.check(CS, CS), undefined);
  state.header = { ...state.header, l1TableOffset: 30 * CS };
  assert.equal(o.check(30 * CS, 8), 'active L1 table');
  assert.equal(o.check(3 * CS, CS), undefined);
});

test('offset 0 for a named structure gets QEMU allocation message, anything else the overlap one', () => {
  const o = new MetadataOverlap(sources().src);
  assert.equal(vetAllocation(o, 0, CS, 'L2 table'), 'Preventing invalid allocation of L2 table at offset 0');
  assert.equal(vetAllocation(o, 0, CS), 'Preventing invalid write on metadata (overlaps with qcow2_header)');
  assert.equal(vetAllocation(o, CS, CS), 'Preventing invalid write on metadata (overlaps with refcount table)');
  assert.equal(vetAllocation(o, 5 * CS, CS), undefined);
});

/** A v3 image of 512-byte clusters by hand: header 0, table 1, block 2 (counts clusters 0..3), L1 3. */
async function smallImage(): Promise<{ store: MemoryStore; rc: Refcounts }> {
  const cs = 512;
  const img = new Uint8Array(4 * cs);
  new DataView(img.buffer).setBigUint64(cs, BigInt(2 * cs));
  for (const c of [0, 1, 2, 3]) img[2 * cs + 2 * c + 1] = 1;
  const store = new MemoryStore(img);
  const rc = await Refcounts.load(store, { clusterSize: cs, refcountBits: 16, tableOffset: cs, tableClusters: 1 });
  return { store, rc };
}

test('under the guard, a zeroed count no longer hands out the metadata cluster', async () => {
  const cs = 512;
  // Without the guard: the count of cluster 1 (the table) is zeroed, and cluster 1 is handed out.
  const bare = await smallImage();
  await bare.rc.set(1, 0);
  assert.equal(await bare.rc.allocClusters(1), cs);

  const { rc } = await smallImage();
  const o = new MetadataOverlap({
    clusterSize: cs,
    header: () => ({ l1TableOffset: 3 * cs, snapshotsOffset: 0 }) as Qcow2Header,
    l1Entries: () => 1,
    isL2Table: () => false,
    refcountTable: () => ({ offset: rc.tableOffset, clusters: rc.tableClusters }),
    isRefcountBlock: (c) => rc.isRefcountBlock(c),
    snapshots: () => [],
  });
  rc.setOverlapGuard((off, bytes, what) => vetAllocation(o, off, bytes, what));
  assert.equal(rc.isRefcountBlock(2), true);
  await rc.set(1, 0);
  await rc.set(2, 0);
  // The hot path leaves a refused range to the general path, which throws.
  assert.equal(rc.allocClustersNow(1), -1);
  await assert.rejects(rc.allocClusters(1), (e: unknown) => e instanceof CorruptionEvent && /overlaps with refcount table/.test(e.message));
  // Cluster 0 is a candidate under the guard, and refused with QEMU's words for an L2 table.
  await rc.set(0, 0);
  await assert.rejects(rc.allocClusters(1, 'L2 table'), /Preventing invalid allocation of L2 table at offset 0/);
  // A sound count keeps allocating past the metadata.
  await rc.set(0, 1);
  await rc.set(1, 1);
  await rc.set(2, 1);
  assert.equal(await rc.allocClusters(2), 4 * cs);
});

test("the levels check QEMU's structures, and per-structure switches override them", () => {
  const names = (mask: number) => OVERLAP_NAMES.filter((_, i) => (mask & (1 << i)) !== 0);
  assert.deepEqual(names(overlapMask({ level: 'none' })), []);
  assert.deepEqual(names(overlapMask({ level: 'constant' })), ['qcow2_header', 'active L1 table', 'refcount table', 'snapshot table', 'bitmap directory']);
  assert.deepEqual(names(overlapMask()), OVERLAP_NAMES.filter((n) => n !== 'inactive L2 table'));
  assert.deepEqual(names(overlapMask({ level: 'all' })), [...OVERLAP_NAMES]);
  assert.deepEqual(names(overlapMask({ checks: { 'inactive-l2': true, 'main-header': false } })), OVERLAP_NAMES.filter((n) => n !== 'qcow2_header'));
  // A structure left out is not named: the next one the range overlaps is.
  const { src } = sources();
  assert.equal(new MetadataOverlap(src, { level: 'none' }).check(0, 5 * CS), undefined);
  assert.equal(new MetadataOverlap(src, { checks: { 'main-header': false } }).check(0, 5 * CS), 'active L1 table');
});

/** Sources with one snapshot whose L1 table (at cluster 8, one entry) names L2 table `l2`. */
function withSnapshot(snap: Partial<Qcow2Snapshot>, l2: number) {
  const s = { l1TableOffset: 8 * CS, l1Size: 1, id: '1', name: 'a', extraUnknown: new Uint8Array(0), ...snap } as unknown as Qcow2Snapshot;
  const { state, src } = sources({ snaps: [s] });
  const reads: number[] = [];
  const read = async (offset: number, into: Uint8Array) => {
    reads.push(offset);
    into.fill(0);
    if (offset === 8 * CS) new DataView(into.buffer, into.byteOffset).setBigUint64(0, BigInt(l2));
  };
  return { state, src: { ...src, read }, reads };
}

test('at level all a snapshot L2 table is checked, read from the snapshot L1 table', async () => {
  const { src, reads } = withSnapshot({}, 12 * CS);
  const cached = new MetadataOverlap(src);
  assert.equal(cached.inactiveL2Stale, false);
  assert.equal(cached.check(12 * CS, CS), undefined);
  const all = new MetadataOverlap(src, { level: 'all' });
  assert.equal(all.inactiveL2Stale, true);
  await all.loadInactiveL2();
  assert.equal(all.inactiveL2Stale, false);
  assert.deepEqual(reads, [8 * CS]);
  assert.equal(all.check(12 * CS + 100, 1), 'inactive L2 table');
  assert.equal(all.check(13 * CS, CS), undefined);
  // The snapshot L1 table itself comes first in QEMU's order.
  assert.equal(all.check(8 * CS, 5 * CS), 'inactive L1 table');
  assert.equal(all.refusal, undefined);
});

test('a snapshot L1 table QEMU refuses refuses every check at the inactive L2 turn, not as corruption', async () => {
  for (const [snap, errno] of [
    [{ l1TableOffset: 8 * CS + 512 }, 'EINVAL'],
    [{ l1Size: 0x10000000 }, 'EFBIG'],
  ] as const) {
    const { src } = withSnapshot(snap, 12 * CS);
    const o = new MetadataOverlap(src, { checks: { 'inactive-l2': true } });
    await o.loadInactiveL2();
    const r = o.vet(5 * CS, CS);
    assert.ok(r instanceof QcowError && !(r instanceof CorruptionEvent) && r.errno === errno, errno);
    // Structures before the inactive L2 tables are still named.
    assert.equal(o.vet(0, 512), 'qcow2_header');
    // A new L2 table: QEMU's refcount block write fails first.
    assert.equal(vetAllocation(o, 4 * CS, CS, 'L2 table'), o.refusal);
    assert.equal(o.refusedAllocation, o.refusal);
    // Without the inactive L2 check, nothing is refused.
    const cached = new MetadataOverlap(src);
    await cached.loadInactiveL2();
    assert.equal(cached.vet(5 * CS, CS), undefined);
  }
});

test('above singleClustersEnd the per-cluster questions are skipped; below it they are asked', () => {
  const { state, src } = sources({ l2: [4, 40], blocks: [2, 30] });
  let asked = 0;
  const counting: OverlapSources = {
    ...src,
    isL2Table: (c) => (asked++, state.l2.has(c)),
    isRefcountBlock: (c) => (asked++, state.blocks.has(c)),
    singleClustersEnd: () => 41,
  };
  const o = new MetadataOverlap(counting);
  // A fresh run at the end of a growing image: no set lookups at all.
  assert.equal(o.check(41 * CS, 32 * CS), undefined);
  assert.equal(asked, 0);
  // Runs that reach below the bound are looked at cluster by cluster, as before.
  assert.equal(o.check(39 * CS, 4 * CS), 'active L2 table');
  assert.equal(o.check(30 * CS, CS), 'refcount block');
  assert.ok(asked > 0);
});

test('Refcounts.refcountBlocksEnd lies above every refcount block, new ones included', async () => {
  const cs = 512;
  const { rc } = await smallImage();
  assert.equal(rc.refcountBlocksEnd(), 3);
  // 512-byte clusters of 16-bit counts: one block describes 256 clusters; cluster 300 needs a
  // second block, which the allocator places in the first free cluster (4).
  await rc.set(300, 1);
  const second = rc.blockOffsets()[1]! / cs;
  assert.equal(rc.isRefcountBlock(second), true);
  assert.ok(rc.refcountBlocksEnd() > second);
  for (let c = rc.refcountBlocksEnd(); c < rc.refcountBlocksEnd() + 300; c++) assert.equal(rc.isRefcountBlock(c), false);
});
