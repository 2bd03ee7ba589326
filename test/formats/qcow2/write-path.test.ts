/**
 * The qcow2 write path against a fake allocator, no qemu needed: the writer, the cluster map and
 * the data I/O are the real modules over an in-memory image, while clusters come from a small
 * allocator that appends at the end of the file, keeps its counts in a Map and logs what it is
 * asked. The store logs every write, so the tests can hold the write path to its ordering rules:
 * data before the L2 entry that points at it, refcounts before the L2 tables that need them
 * (the metadata cache's write-back dependency), L2 tables before L1, and frees only afterwards.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import type { ByteStore } from '#src/storage/types.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { readHeader } from '#src/formats/qcow2/read-header.js';
import { Qcow2Image } from '#src/formats/qcow2/image.js';
import { ClusterMap } from '#src/formats/qcow2/cluster-map.js';
import { DataIo } from '#src/formats/qcow2/data-io.js';
import { Qcow2Writer } from '#src/formats/qcow2/write.js';
import { readL2Entry } from '#src/formats/qcow2/l2-entry.js';
import { l1TableOffset } from '#src/formats/qcow2/l1-entry.js';
import type { Allocator } from '#src/formats/qcow2/alloc.js';

const CLUSTER = 4096;
const SIZE = 1024 * 1024;

/** `zeros`: a write of zeros only (a new L2 table placed in its cluster before anything names it). */
type Event = { kind: 'write'; offset: number; length: number; zeros: boolean } | { kind: 'alloc'; offset: number } | { kind: 'refcounts' } | { kind: 'frees'; runs: number };

/** A MemoryStore that logs each write into `events`. */
function recording(store: MemoryStore, events: Event[]): ByteStore {
  return new Proxy(store, {
    get(target, prop, receiver) {
      if (prop === 'write') {
        return async (offset: number, data: Uint8Array) => {
          events.push({ kind: 'write', offset, length: data.length, zeros: data.every((b) => b === 0) });
          await target.write(offset, data);
        };
      }
      const v = Reflect.get(target, prop, receiver) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

/** Appends clusters at the end of the file; counts in memory; writeBack only logs. */
class FakeAllocator implements Allocator {
  readonly counts = new Map<number, number>();
  private pending: Array<[number, number]> = [];
  freedRuns: Array<[number, number]> = [];
  private next: number;
  private dirty = false;
  allocations = 0;

  constructor(
    fileSize: number,
    private readonly events: Event[],
  ) {
    this.next = Math.ceil(fileSize / CLUSTER);
  }

  get end(): number {
    return this.next;
  }
  readonly tableOffset = 0;
  readonly tableClusters = 0;
  readonly cachedBlocks = 0;
  blockOffsets(): readonly number[] {
    return [];
  }

  async allocClusters(n: number): Promise<number> {
    const at = this.next;
    this.next += n;
    for (let c = at; c < at + n; c++) this.counts.set(c, 1);
    this.allocations += n;
    this.dirty = true;
    this.events.push({ kind: 'alloc', offset: at * CLUSTER });
    return at * CLUSTER;
  }

  async allocBytes(size: number): Promise<number> {
    assert.ok(size <= CLUSTER);
    return this.allocClusters(1);
  }

  free(offset: number, length: number): void {
    this.pending.push([offset, length]);
  }

  get hasPendingFrees(): boolean {
    return this.pending.length > 0;
  }

  async update(offset: number, length: number, delta: number): Promise<void> {
    for (let c = Math.floor(offset / CLUSTER); c <= Math.floor((offset + length - 1) / CLUSTER); c++) {
      this.counts.set(c, (this.counts.get(c) ?? 0) + delta);
    }
    this.dirty = true;
  }

  async get(cluster: number): Promise<number> {
    return this.counts.get(cluster) ?? 0;
  }

  peek(cluster: number): number | undefined {
    return this.counts.get(cluster) ?? 0;
  }

  async applyPendingFrees(): Promise<boolean> {
    this.freedRuns = [];
    if (this.pending.length === 0) return false;
    this.events.push({ kind: 'frees', runs: this.pending.length });
    for (const [off, len] of this.pending) {
      await this.update(off, len, -1);
      if ((this.counts.get(off / CLUSTER) ?? 0) === 0) this.freedRuns.push([off, len]);
    }
    this.pending = [];
    return true;
  }

  async writeBack(): Promise<boolean> {
    if (!this.dirty) return false;
    this.events.push({ kind: 'refcounts' });
    this.dirty = false;
    return true;
  }
}

interface Setup {
  events: Event[];
  alloc: FakeAllocator;
  image: Qcow2Image;
  map: ClusterMap;
  io: DataIo;
  writer: Qcow2Writer;
}

async function setup(size = SIZE, cacheBytes = 1024 * 1024): Promise<Setup> {
  const mem = new MemoryStore(undefined, { name: 'fake.qcow2' });
  await createQcow2(mem, { size, options: { cluster_size: String(CLUSTER) } });
  const events: Event[] = [];
  const store = recording(mem, events);
  const { header, fileSize } = await readHeader(store);
  const image = new Qcow2Image(store, header, fileSize, false, { size: header.size });
  const map = new ClusterMap(image, cacheBytes);
  await map.loadL1(header.l1TableOffset, header.l1Size, 'L1 table');
  const io = new DataIo(image, map, async (_offset, into) => {
    into.fill(0);
  });
  const alloc = new FakeAllocator(fileSize, events);
  const writer = await Qcow2Writer.attach({
    image,
    map,
    io,
    hasBacking: () => false,
    // Every cluster holds data: a partial zero write writes zero bytes, as it did before.
    layerStatus: async (offset, length) => [{ offset, length, allocated: true, zero: false, data: true }],
    chainReadsZero: async () => false,
    bitmapLimits: {},
    allocator: alloc,
  });
  events.length = 0;
  return { events, alloc, image, map, io, writer };
}

/** Index in `events` of the first write that touches [offset, +length). */
function firstWrite(events: Event[], offset: number, length: number): number {
  return events.findIndex((e) => e.kind === 'write' && e.offset < offset + length && offset < e.offset + e.length);
}

/** The first write into [offset, +length) with something else than zeros (an L2 table's entries, not its placement). */
function firstEntriesWrite(events: Event[], offset: number, length: number): number {
  return events.findIndex((e) => e.kind === 'write' && !e.zeros && e.offset < offset + length && offset < e.offset + e.length);
}

test('a write to an unallocated cluster: data, then refcounts, then the L2 table, then L1', async () => {
  const { events, alloc, image, map, io, writer } = await setup();
  const data = new Uint8Array(CLUSTER).fill(0xa5);
  await writer.write(3 * CLUSTER, data);
  await writer.flush();

  // Two clusters from the allocator: the new L2 table, then the data cluster.
  assert.equal(alloc.allocations, 2);
  const l2 = l1TableOffset(map.l1, 0);
  const table = await map.l2TableFor(0);
  assert.ok(table);
  const entry = readL2Entry(table.data, 3, image.l2Context);
  assert.equal(entry.kind, 'normal');
  assert.notEqual(entry.hi & 0x80000000, 0, 'COPIED is set on a fresh cluster');
  assert.equal(alloc.counts.get(entry.hostOffset / CLUSTER), 1);

  const dataAt = firstWrite(events, entry.hostOffset, CLUSTER);
  const refcountsAt = events.findIndex((e) => e.kind === 'refcounts');
  // The new table is placed in its cluster (zeros: the cluster may have held anything) first,
  // named by nothing yet; its entries are written back later.
  const placedAt = firstWrite(events, l2, CLUSTER);
  const tableAt = firstEntriesWrite(events, l2, CLUSTER);
  const l1At = firstWrite(events, image.header.l1TableOffset, 8);
  assert.ok(dataAt >= 0 && refcountsAt >= 0 && tableAt >= 0 && l1At >= 0, JSON.stringify(events));
  assert.ok(placedAt < tableAt && (events[placedAt] as { zeros: boolean }).zeros, 'the new table is zeroed on disk before its entries are written');
  assert.ok(dataAt < tableAt, 'data before the entry that points at it');
  assert.ok(refcountsAt < tableAt, 'refcounts before the L2 table that needs them');
  assert.ok(tableAt < l1At, 'the L2 table before the L1 entry that names it');

  const back = new Uint8Array(CLUSTER);
  await io.read(3 * CLUSTER, back);
  assert.deepEqual(back, data);
});

test('an overwrite of an owned cluster writes in place: no allocation, no metadata', async () => {
  const { events, alloc, writer, io } = await setup();
  await writer.write(0, new Uint8Array(CLUSTER).fill(1));
  await writer.flush();
  const before = alloc.allocations;
  events.length = 0;
  const partial = new Uint8Array(100).fill(2);
  await writer.write(50, partial);
  await writer.flush();
  assert.equal(alloc.allocations, before);
  const writes = events.filter((e) => e.kind === 'write');
  assert.equal(writes.length, 1, JSON.stringify(events));
  assert.equal(writes[0]!.kind === 'write' && writes[0]!.length, 100);
  const back = new Uint8Array(CLUSTER);
  await io.read(0, back);
  assert.deepEqual(back.subarray(0, 50), new Uint8Array(50).fill(1));
  assert.deepEqual(back.subarray(50, 150), partial);
  assert.deepEqual(back.subarray(150), new Uint8Array(CLUSTER - 150).fill(1));
});

test('a partial write to a fresh cluster fills the rest from what the guest read before (zeros here)', async () => {
  const { writer, io } = await setup();
  await writer.write(CLUSTER + 10, new Uint8Array([7, 8, 9]));
  const back = new Uint8Array(CLUSTER);
  await io.read(CLUSTER, back);
  const want = new Uint8Array(CLUSTER);
  want.set([7, 8, 9], 10);
  assert.deepEqual(back, want);
});

test('zeroing with unmap drops the reference only after the table is written (deferred free)', async () => {
  const { events, alloc, map, image, writer } = await setup();
  await writer.write(2 * CLUSTER, new Uint8Array(CLUSTER).fill(3));
  await writer.flush();
  const table = (await map.l2TableFor(0))!;
  const host = readL2Entry(table.data, 2, image.l2Context).hostOffset;
  events.length = 0;
  await writer.writeZeroes(2 * CLUSTER, CLUSTER, { mayUnmap: true });
  // Not yet: the table that dropped the reference is not on disk.
  assert.equal(alloc.counts.get(host / CLUSTER), 1);
  await writer.flush();
  assert.equal(alloc.counts.get(host / CLUSTER), 0);
  const l2 = l1TableOffset(map.l1, 0);
  const tableAt = firstWrite(events, l2, CLUSTER);
  const freesAt = events.findIndex((e) => e.kind === 'frees');
  assert.ok(tableAt >= 0 && freesAt > tableAt, JSON.stringify(events));
  const entry = readL2Entry((await map.l2TableFor(0))!.data, 2, image.l2Context);
  assert.equal(entry.kind, 'zero-plain');
});

test('a compressed write links a compressed descriptor that reads back', async () => {
  const { writer, io, map, image } = await setup();
  const data = new Uint8Array(CLUSTER);
  for (let i = 0; i < data.length; i++) data[i] = i % 7;
  await writer.writeCompressed(4 * CLUSTER, data);
  await writer.flush();
  const entry = readL2Entry((await map.l2TableFor(0))!.data, 4, image.l2Context);
  assert.equal(entry.kind, 'compressed');
  const back = new Uint8Array(CLUSTER);
  io.forgetCompressed();
  await io.read(4 * CLUSTER, back);
  assert.deepEqual(back, data);
});

test('an L2 table evicted between flushes is written only after the refcounts it needs', async () => {
  // 2 MiB per L2 table with 4 KiB clusters; a cache of one table's budget keeps the minimum (4).
  const coverage = (CLUSTER / 8) * CLUSTER;
  const { events, map, writer } = await setup(8 * coverage, CLUSTER);
  for (let t = 0; t < 8; t++) await writer.write(t * coverage, new Uint8Array(CLUSTER).fill(t + 1));
  // No flush yet: the first tables were written back by eviction.
  const tables = new Set<number>();
  for (let t = 0; t < 8; t++) tables.add(l1TableOffset(map.l1, t));
  // (Tables' placements, all zeros and named by nothing, need no refcounts before them.)
  const evicted = events.filter((e) => e.kind === 'write' && !e.zeros && tables.has(e.offset));
  assert.ok(evicted.length > 0, 'some tables were evicted before the flush');
  for (const e of evicted) {
    // Every allocation before the table's write-back had its counts written back before it.
    const before = events.slice(0, events.indexOf(e)).map((x) => x.kind);
    assert.ok(before.lastIndexOf('refcounts') > before.lastIndexOf('alloc'), `table ${JSON.stringify(e)} overtook the refcounts it needs`);
  }
  await writer.flush();
});

test('a write after a discard reuses the freed clusters only once the table that dropped them is written', async () => {
  const { events, alloc, map, image, writer } = await setup();
  await writer.write(2 * CLUSTER, new Uint8Array(CLUSTER).fill(3));
  await writer.flush();
  const host = readL2Entry((await map.l2TableFor(0))!.data, 2, image.l2Context).hostOffset;
  events.length = 0;
  await writer.discard(2 * CLUSTER, CLUSTER);
  // The discard alone changes nothing on disk and no count.
  assert.equal(alloc.counts.get(host / CLUSTER), 1);
  assert.equal(events.filter((e) => e.kind === 'frees').length, 0);
  await writer.write(5 * CLUSTER, new Uint8Array(CLUSTER).fill(4));
  // The write settled the discard first: table written, then the frees, then its own allocation.
  const l2 = l1TableOffset(map.l1, 0);
  const tableAt = firstWrite(events, l2, CLUSTER);
  const freesAt = events.findIndex((e) => e.kind === 'frees');
  const allocAt = events.findIndex((e) => e.kind === 'alloc');
  assert.ok(tableAt >= 0 && freesAt > tableAt && allocAt > freesAt, JSON.stringify(events));
  assert.equal(alloc.counts.get(host / CLUSTER), 0);
  // A second write does not settle again: nothing was discarded since.
  events.length = 0;
  await writer.write(6 * CLUSTER, new Uint8Array(CLUSTER).fill(5));
  assert.equal(events.filter((e) => e.kind === 'frees').length, 0, JSON.stringify(events));
  assert.equal(firstWrite(events, l2, CLUSTER), -1, 'no table write-back before an ordinary allocation');
  await writer.flush();
});
