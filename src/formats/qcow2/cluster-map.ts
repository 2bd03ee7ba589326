/**
 * The cluster map: where each guest cluster lives, and the one owner of the tables that say so.
 * It holds the active L1 table (or the opened snapshot's), the metadata cache of L2 tables, and,
 * when the image is writable, the allocator (alloc.ts) that new tables and clusters come from.
 *
 * Reading: `mapRuns(offset, length)` splits a guest range into runs of one subcluster kind each
 * (`GuestRun`), contiguous host ranges merged, so each `normal` run is one store read;
 * `mappedHostRun` answers the common case (one cached table, contiguous normal clusters) without
 * building runs. The L2 cache holds 4 KiB slices of tables (see `slice`); a miss loads the slice
 * here (`l2TableFor` -> metadata cache -> `load`); a reader's load never writes a slice back
 * (metadata-cache.ts says why), the writer's do (`l2TableFor(offset, true)`, `l2ForWrite`).
 *
 * Linking (writable images): `l2ForWrite` gives the slice of the active L2 table for a guest
 * offset, the table allocated when missing and copied when a snapshot shares it (either written
 * whole to its new cluster at once); `setEntry` / `release` change entries and drop the
 * references they held (deferred in the allocator until the tables are on disk); L1 entries
 * changed are written by `writeL1` at the next flush. Whole-cluster zeroing, emptying (commit),
 * growing the L1 table and shrinking live here too. The ordering of write-back (refcounts, then
 * L2 tables, then L1, then frees) is the writer's (write.ts), which calls in here.
 */
import { CorruptionEvent, QcowError, altHex, corrupt } from '../../core/errors.js';
import { firstNonZero } from '../../core/bytes.js';
import { MAX_L1_BYTES, l1EntriesFor } from './layout.js';
import { l1EntryCopied, l1EntryEmpty, l1TableOffset, setL1Entry } from './l1-entry.js';
import {
  ALL_SUBCLUSTERS_ZERO,
  contiguousEntries,
  decodeL2Entry,
  l2EntryCopied,
  l2EntryEmpty,
  l2EntryInvalid,
  readL2Entry,
  setL2Entry,
  standardL2Entry,
  subclusterKind,
  type ClusterDescriptor,
  type SubclusterKind,
} from './l2-entry.js';
import { TableCache, type CachedTable } from './metadata-cache.js';
import type { Allocator } from './alloc.js';
import type { FreeReason } from './free-reason.js';
import type { OverlapCheckOptions } from '../../core/block-device.js';
import { MetadataOverlap, vetAllocation } from './overlap.js';
import type { Qcow2Image } from './image.js';

/** L2 slice size: the unit the L2 cache holds (see ClusterMap.slice). */
export const L2_SLICE_BYTES = 4096;

/** Default L2 cache budget: 32 MiB of tables maps 128 GiB with 64 KiB clusters. */
export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

/** A guest range whose every byte has the same kind in this layer. */
export interface GuestRun {
  offset: number;
  length: number;
  kind: SubclusterKind;
  /** Host offset of the run's first byte, for normal / zero-alloc / unallocated-alloc runs. */
  hostOffset?: number;
  /** Compressed runs (never merged across clusters): the cluster's descriptor and guest start. */
  descriptor?: ClusterDescriptor;
  clusterStart?: number;
}

export class ClusterMap {
  private l1Bytes: Uint8Array = new Uint8Array(0);
  private entries = 0;
  private readonly l1Dirty = new Set<number>();
  readonly l2Cache: TableCache;
  /**
   * The unit the L2 cache holds: a slice of a table, of at most L2_SLICE_BYTES, as qemu's L2 cache
   * entries are. A table touched then costs 4 KiB of cache, not a whole cluster (2 MiB with 2 MiB
   * clusters), and a cold random request loads 4 KiB of metadata: with 64 KiB clusters the default
   * budget holds 8192 slices of 8192 tables, not 512 whole tables (a 1 TiB image has 2048). Code
   * that works on a whole table walks it slice by slice, or reads it with `wholeTable`.
   */
  readonly slice: { entries: number; bytes: number; coverage: number };
  /** The allocator, present once the image is opened for writing (see attachRefcounts). */
  private rc: Allocator | null = null;
  /** A descriptor reused by loops that decode an entry per cluster and keep none of them. */
  private readonly scratchEntry = readL2Entry(new Uint8Array(16), 0, { clusterBits: 9, extendedL2: false, externalDataFile: false });

  constructor(
    private readonly image: Qcow2Image,
    /** Metadata cache budget: all of it for L2 tables (the allocator gets a quarter more). */
    readonly cacheBytes: number,
    /** The structures the overlap guard checks (OpenOptions.overlapCheck). */
    private readonly overlapCheck?: OverlapCheckOptions,
  ) {
    const g = image.geometry;
    const sliceBytes = Math.min(g.clusterSize, L2_SLICE_BYTES);
    const sliceEntries = sliceBytes / g.l2EntryBytes;
    this.slice = { entries: sliceEntries, bytes: sliceBytes, coverage: sliceEntries * g.clusterSize };
    this.l2Cache = new TableCache({
      tableBytes: sliceBytes,
      budgetBytes: cacheBytes,
      load: (off, into) => this.loadTable(off, into),
      writeBack: (off, data) => {
        image.store.debugEvent?.('l2_update');
        return image.store.write(off, data);
      },
    });
  }

  /** The L1 table in use (active, or the opened snapshot's), as raw big-endian bytes. Read only. */
  get l1(): Uint8Array {
    return this.l1Bytes;
  }

  get l1Entries(): number {
    return this.entries;
  }

  get refcounts(): Allocator {
    if (!this.rc) throw new QcowError('QCOW_READ_ONLY', 'image is opened read-only');
    return this.rc;
  }

  /**
   * Writable images: the allocator, what must be on disk before any L2 table is written, and how
   * the cache gets a trim run under the writer's lock (see metadata-cache.ts).
   */
  attachRefcounts(rc: Allocator, beforeTableWrite: () => Promise<void>, underLock: (job: () => Promise<void>) => void): void {
    this.rc = rc;
    this.guard(rc);
    this.l2Cache.setDependency(beforeTableWrite, underLock);
  }

  /** A rebuilt allocator (amend changing refcount_bits). */
  replaceRefcounts(rc: Allocator): void {
    this.rc = rc;
    this.guard(rc);
  }

  /**
   * Give the allocator the overlap guard (overlap.ts): each structure is read from its owner, the
   * L2 tables from this map's L1 table.
   */
  private guard(rc: Allocator): void {
    if (!rc.setOverlapGuard) return;
    const image = this.image;
    const overlap = new MetadataOverlap({
      clusterSize: image.clusterSize,
      header: () => image.header,
      l1Entries: () => this.entries,
      isL2Table: (c) => this.isL2Table(c),
      refcountTable: () => ({ offset: rc.tableOffset, clusters: rc.tableClusters }),
      isRefcountBlock: (c) => rc.isRefcountBlock?.(c) ?? false,
      singleClustersEnd: () => Math.max(this.l2TablesEnd(), rc.refcountBlocksEnd?.() ?? Infinity),
      snapshots: () => image.snapshots,
      read: (offset, into) => image.store.read(offset, into),
    }, this.overlapCheck);
    rc.setOverlapGuard((offset, bytes, what) => vetAllocation(overlap, offset, bytes, what));
    this.overlapGuard = overlap;
  }

  /** The overlap guard of a writable image (the writer checks writes in place with it too). */
  get overlap(): MetadataOverlap | undefined {
    return this.overlapGuard;
  }
  private overlapGuard: MetadataOverlap | undefined;

  /**
   * How many active L1 entries name each cluster as their L2 table: built at the first question
   * (one pass over L1), then kept by setL1Entry; dropped when the whole table is replaced.
   */
  private l2Clusters: Map<number, number> | undefined;
  /**
   * One past the highest cluster l2Clusters has held since it was built (an upper bound: a table
   * dropped from it leaves the bound where it was), so the overlap guard can tell at once that a
   * range above it holds no L2 table.
   */
  private l2ClustersEnd = 0;

  /** Whether `cluster` holds an active L2 table (the overlap guard's question). */
  isL2Table(cluster: number): boolean {
    return this.activeL2Clusters().has(cluster);
  }

  /** A cluster index above every active L2 table (see l2ClustersEnd). */
  l2TablesEnd(): number {
    this.activeL2Clusters();
    return this.l2ClustersEnd;
  }

  private activeL2Clusters(): Map<number, number> {
    let m = this.l2Clusters;
    if (!m) {
      m = new Map();
      const cs = this.image.clusterSize;
      let end = 0;
      for (let i = 0; i < this.entries; i++) {
        const off = l1TableOffset(this.l1Bytes, i);
        if (off === 0) continue;
        const c = Math.floor(off / cs);
        m.set(c, (m.get(c) ?? 0) + 1);
        if (c >= end) end = c + 1;
      }
      this.l2Clusters = m;
      this.l2ClustersEnd = end;
    }
    return m;
  }

  // --- the L1 table -------------------------------------------------------------------------------

  /** Read the L1 table at `offset` (at most qemu's 32 MiB), bounds-checked against the file. */
  async loadL1(offset: number, entries: number, what: string): Promise<void> {
    const bytes = entries * 8;
    if (bytes > MAX_L1_BYTES) throw corrupt(`${what}: ${entries} entries is more than qemu's limit of ${MAX_L1_BYTES / 8}`);
    const l1 = new Uint8Array(bytes);
    if (entries > 0) {
      this.checkAligned(offset, what);
      if (offset === 0 || offset + bytes > this.image.fileSize) {
        throw corrupt(`${what} [0x${offset.toString(16)}, +0x${bytes.toString(16)}) lies outside the file (${this.image.fileSize} bytes)`);
      }
      await this.image.store.read(offset, l1);
    }
    this.l1Bytes = l1;
    this.entries = entries;
    this.l2Clusters = undefined;
    if (entries < l1EntriesFor(this.image.size, this.image.geometry)) {
      throw corrupt(`L1 table is too small: ${entries} entries for a ${this.image.size}-byte image`);
    }
  }

  /** Re-read the active L1 table from disk (after a repair or a rewrite of the tables). */
  async reloadL1(): Promise<void> {
    if (this.image.openedSnapshot === undefined && this.l1Bytes.length > 0) await this.image.store.read(this.image.header.l1TableOffset, this.l1Bytes);
    this.l1Dirty.clear();
    this.l2Clusters = undefined;
  }

  /**
   * Take `l1` (written to disk by the caller at the header's L1 offset) as the active L1 table:
   * growing, or a snapshot applied. Pending L1 entry writes are dropped: `l1` holds them all.
   */
  replaceL1(l1: Uint8Array): void {
    this.l1Bytes = l1;
    this.entries = l1.length / 8;
    this.l1Dirty.clear();
    this.l2Clusters = undefined;
  }

  /** Make L1 entry `i` name the L2 table at `offset` (0: none); written back by writeL1. */
  setL1Entry(i: number, offset: number, copied: boolean): void {
    const m = this.l2Clusters;
    if (m) {
      const cs = this.image.clusterSize;
      const old = Math.floor(l1TableOffset(this.l1Bytes, i) / cs);
      const n = m.get(old) ?? 0;
      if (old !== 0 && n <= 1) m.delete(old);
      else if (old !== 0) m.set(old, n - 1);
      if (offset !== 0) {
        const c = Math.floor(offset / cs);
        m.set(c, (m.get(c) ?? 0) + 1);
        if (c >= this.l2ClustersEnd) this.l2ClustersEnd = c + 1;
      }
    }
    setL1Entry(this.l1Bytes, i, offset, copied);
    this.l1Dirty.add(i);
  }

  /** Set or clear COPIED on L1 entry `i` (snapshots recompute it). */
  setL1Copied(i: number, copied: boolean): void {
    if (l1EntryCopied(this.l1Bytes, i) === copied) return;
    setL1Entry(this.l1Bytes, i, l1TableOffset(this.l1Bytes, i), copied);
    this.l1Dirty.add(i);
  }

  /** Write the changed L1 entries, runs of neighbours in one write each. True if any were. */
  async writeL1(): Promise<boolean> {
    if (this.l1Dirty.size === 0) return false;
    const idx = [...this.l1Dirty].sort((a, b) => a - b);
    this.l1Dirty.clear();
    const base = this.image.header.l1TableOffset;
    this.image.store.debugEvent?.('l1_update');
    for (let i = 0; i < idx.length; ) {
      let j = i;
      while (j + 1 < idx.length && idx[j + 1] === idx[j]! + 1) j++;
      await this.image.store.write(base + idx[i]! * 8, this.l1Bytes.subarray(idx[i]! * 8, (idx[j]! + 1) * 8));
      i = j + 1;
    }
    return true;
  }

  /** Whether L1 entry `i` names no L2 table (past the table, or host offset bits 9-55 all 0). */
  private l1EntryEmpty(i: number): boolean {
    return i >= this.entries || l1EntryEmpty(this.l1Bytes, i);
  }

  private checkAligned(offset: number, what: string): void {
    if (offset % this.image.clusterSize !== 0) throw corrupt(`${what} 0x${offset.toString(16)} is not cluster aligned`);
  }

  /**
   * A table slice from the file. A table in a last cluster the file holds only in part (an L1
   * table linked onto itself as its own L2 table, iotest 060: qemu-img create writes the L1 table
   * unpadded) reads as zeros past the file's end, as QEMU's block layer reads it. A table that
   * starts at or past the end is refused (QEMU reads zeros there too; we keep the clean error).
   */
  private async loadTable(offset: number, into: Uint8Array): Promise<void> {
    if (offset >= this.image.fileSize) {
      throw corrupt(`L2 table at 0x${offset.toString(16)} lies beyond the end of the file (${this.image.fileSize} bytes)`);
    }
    const inFile = Math.max(0, Math.min(into.length, this.image.fileSize - offset));
    if (inFile < into.length) into.fill(0, inFile);
    this.image.store.debugEvent?.('l2_load');
    if (inFile > 0) await this.image.store.read(offset, into.subarray(0, inFile));
  }

  // --- lookup ---------------------------------------------------------------------------------------

  /**
   * The L2 slice covering `guestOffset` (its first entry is that of the slice's first cluster;
   * `sliceIndex` gives a cluster's), or null when the L1 entry is empty. `forWrite`:
   * the caller is the writer with its lock held (a miss may then write tables back).
   */
  async l2TableFor(guestOffset: number, forWrite = false): Promise<CachedTable | null> {
    const g = this.image.geometry;
    const i = Math.floor(guestOffset / g.l2Coverage);
    if (i >= this.entries) return null;
    const l2Offset = l1TableOffset(this.l1Bytes, i);
    if (l2Offset === 0) return null;
    if (l2Offset % g.clusterSize !== 0) throw unalignedL2(l2Offset, i);
    const at = this.sliceAt(l2Offset, guestOffset);
    return forWrite ? this.l2Cache.getForWrite(at) : this.l2Cache.get(at);
  }

  /** Host offset of the slice of the L2 table at `l2Offset` that maps `guest`. */
  sliceAt(l2Offset: number, guest: number): number {
    return l2Offset + Math.floor((guest % this.image.geometry.l2Coverage) / this.slice.coverage) * this.slice.bytes;
  }

  /** Index, in its slice, of the entry of the cluster holding `guest`. */
  sliceIndex(guest: number): number {
    return Math.floor((guest % this.slice.coverage) / this.image.clusterSize);
  }

  /** Guest offset where the slice mapping `guest` ends. */
  sliceEnd(guest: number): number {
    const sc = this.slice.coverage;
    return (Math.floor(guest / sc) + 1) * sc;
  }

  /** The runs of [offset, offset+length), in order, merged where kind and host offsets run on. */
  async mapRuns(offset: number, length: number): Promise<GuestRun[]> {
    const g = this.image.geometry;
    const runs: GuestRun[] = [];
    const push = (r: GuestRun) => {
      const last = runs[runs.length - 1];
      if (
        last &&
        last.kind === r.kind &&
        r.kind !== 'compressed' &&
        last.offset + last.length === r.offset &&
        (last.hostOffset === undefined) === (r.hostOffset === undefined) &&
        (last.hostOffset === undefined || last.hostOffset + last.length === r.hostOffset)
      ) {
        last.length += r.length;
      } else {
        runs.push(r);
      }
    };
    const end = offset + length;
    let pos = offset;
    const sc = this.slice.coverage;
    while (pos < end) {
      const tableEnd = Math.min(end, (Math.floor(pos / sc) + 1) * sc);
      const table = await this.l2TableFor(pos);
      if (!table) {
        // The rest of the table, and the next tables if missing too (most of a large sparse
        // image), in one run.
        let runEnd = Math.min(end, (Math.floor(pos / g.l2Coverage) + 1) * g.l2Coverage);
        while (runEnd < end) {
          const i = Math.floor(runEnd / g.l2Coverage);
          if (!this.l1EntryEmpty(i)) break;
          // Skip the all-zero entries that follow in one scan; the first non-zero one is then
          // looked at on its own (an entry with only flag bits set still names no table).
          const scanTo = Math.min(this.l1Bytes.length, Math.ceil(end / g.l2Coverage) * 8);
          const next = Math.floor(firstNonZero(this.l1Bytes, Math.min((i + 1) * 8, scanTo), scanTo) / 8);
          runEnd = Math.min(end, Math.max(i + 1, next) * g.l2Coverage);
        }
        push({ offset: pos, length: runEnd - pos, kind: 'unallocated' });
        pos = runEnd;
        continue;
      }
      while (pos < tableEnd) {
        const clusterStart = pos - (pos % g.clusterSize);
        const clusterEnd = Math.min(tableEnd, clusterStart + g.clusterSize);
        const index = (clusterStart % sc) / g.clusterSize;
        // A run of all-zero entries (unallocated clusters, most of a sparse table) in one step,
        // without decoding each: it reads exactly as the entries one by one would.
        const entryStart = index * g.l2EntryBytes;
        const t = table.data;
        // (Most entries of an allocated table are not zero: a glance at the offset bytes first.)
        const nonZero =
          (t[entryStart + 5]! | t[entryStart + 6]! | t[entryStart]!) !== 0
            ? entryStart
            : firstNonZero(t, entryStart, Math.ceil((tableEnd - (clusterStart - (clusterStart % sc))) / g.clusterSize) * g.l2EntryBytes);
        if (nonZero >= entryStart + g.l2EntryBytes) {
          const sliceStart = clusterStart - (clusterStart % sc);
          const runEnd = Math.min(tableEnd, sliceStart + Math.floor(nonZero / g.l2EntryBytes) * g.clusterSize);
          push({ offset: pos, length: runEnd - pos, kind: 'unallocated' });
          pos = runEnd;
          continue;
        }
        // Into the scratch descriptor: no await until it is done with (a compressed run keeps a copy).
        const d = decodeL2Entry(table.data, index, this.image.l2Context, this.scratchEntry, true);
        if (d.kind !== 'compressed' && d.hostOffset % g.clusterSize !== 0) throw this.unalignedCluster(table, index, d.hostOffset);
        this.checkHostOffset(d, clusterStart);
        if (d.kind === 'compressed') {
          push({ offset: pos, length: clusterEnd - pos, kind: 'compressed', descriptor: { ...d }, clusterStart });
          pos = clusterEnd;
          continue;
        }
        if (d.kind === 'normal' && !g.extendedL2) {
          // The clusters that follow in the table and in the file (a fully allocated image is one
          // such run per table) in one step: their entries are this one plus k clusters, flags
          // alike, so they decode alike; only the last one's offset needs its bounds check.
          const runEnd = contiguousEntries(table.data, index, (tableEnd - clusterStart) / g.clusterSize, g.clusterSize);
          const last = clusterStart + (runEnd - index - 1) * g.clusterSize;
          if (runEnd - index > 1) this.checkDataOffset(false, d.hostOffset + (last - clusterStart), last);
          const end = Math.min(tableEnd, last + g.clusterSize);
          push({ offset: pos, length: end - pos, kind: 'normal', hostOffset: d.hostOffset + (pos - clusterStart) });
          pos = end;
          continue;
        }
        // QEMU's read path signals a contradictory bitmap as a corruption of the image.
        if (l2EntryInvalid(d, g.extendedL2)) throw this.invalidEntry(table, index, 'read');
        while (pos < clusterEnd) {
          const sub = Math.floor((pos - clusterStart) / g.subclusterSize);
          const subEnd = Math.min(clusterEnd, clusterStart + (sub + 1) * g.subclusterSize);
          const kind = subclusterKind(d, sub, g.extendedL2);
          const hasHost = kind === 'normal' || kind === 'zero-alloc' || kind === 'unallocated-alloc';
          push({ offset: pos, length: subEnd - pos, kind, hostOffset: hasHost ? d.hostOffset + (pos - clusterStart) : undefined });
          pos = subEnd;
        }
      }
    }
    return runs;
  }

  /** Data clusters must start inside their file (external data files may be shorter: reads past them are zeros). */
  private checkHostOffset(d: ClusterDescriptor, guest: number): void {
    if (d.kind === 'unallocated' || d.kind === 'zero-plain') return;
    this.checkDataOffset(d.kind === 'compressed', d.hostOffset, guest);
  }

  /** checkHostOffset of a cluster with a host offset, without a descriptor (the last of a run of normal clusters). */
  private checkDataOffset(compressed: boolean, hostOffset: number, guest: number): void {
    if (this.image.external && !compressed) return;
    if (hostOffset >= this.image.fileSize) {
      throw corrupt(`L2 entry for guest offset 0x${guest.toString(16)} points at 0x${hostOffset.toString(16)}, beyond the end of the file (${this.image.fileSize} bytes)`);
    }
  }

  /**
   * The common request, worked out synchronously: [offset, +length) inside one L2 table that is
   * cached, every cluster normal and the host clusters contiguous. Returns the host offset, or -1
   * when the general path (mapRuns) must decide. Saves the run objects and promise chain per
   * request that dominated small reads (about half of a 4 KiB read's CPU time).
   */
  mappedHostRun(offset: number, length: number): number {
    const g = this.image.geometry;
    if (this.image.encryption || g.extendedL2) return -1;
    const sc = this.slice.coverage;
    // One slice (and so one table) only.
    if (Math.floor(offset / sc) !== Math.floor((offset + length - 1) / sc)) return -1;
    const i = Math.floor(offset / g.l2Coverage);
    if (i >= this.entries) return -1;
    const l2Offset = l1TableOffset(this.l1Bytes, i);
    const cs = g.clusterSize;
    // Empty, misaligned (the general path reports it) or not cached: the general path decides.
    if (l2Offset === 0 || l2Offset % cs !== 0) return -1;
    const table = this.l2Cache.peek(l2Offset + Math.floor((offset % g.l2Coverage) / sc) * this.slice.bytes);
    if (!table) return -1;
    // The first entry decoded; the others only compared with it as raw words (contiguousEntries:
    // each the previous plus one cluster, flags alike, so each decodes as a normal cluster too).
    // Decoding every entry was most of a 4 KiB-cluster copy's JavaScript: 512 per 2 MiB read.
    const first = offset - (offset % cs);
    const index = (first % sc) / cs;
    const d = this.scratchEntry; // looked at within this call only
    decodeL2Entry(table.data, index, this.image.l2Context, d, true);
    // (An unaligned cluster: the general path signals it.)
    if (d.kind !== 'normal' || d.hostOffset % cs !== 0) return -1;
    this.checkHostOffset(d, first);
    const clusters = Math.ceil((offset + length - first) / cs);
    if (clusters > 1) {
      if (contiguousEntries(table.data, index, clusters, cs) < index + clusters) return -1;
      // Only the last cluster can lie past the end of the file; the general path reports it.
      if (!this.image.external && d.hostOffset + (clusters - 1) * cs >= this.image.fileSize) return -1;
    }
    return d.hostOffset + (offset - first);
  }

  // --- linking (writable images) ----------------------------------------------------------------------

  /** The file grew to hold what the allocator handed out. */
  noteGrowth(): void {
    const end = this.refcounts.end * this.image.clusterSize;
    this.image.noteFileEnd(end);
  }

  /**
   * Write the allocator's changes back (`barrier` where a later write must not overtake them) and
   * take the refcount table's place into the header, which the allocator rewrites on disk when
   * the table moves. True if anything was written.
   */
  async writeRefcounts(barrier: () => Promise<void>): Promise<boolean> {
    const rc = this.refcounts;
    const wrote = await rc.writeBack(barrier);
    this.image.noteHeaderWritten((h) => {
      h.refcountTableOffset = rc.tableOffset;
      h.refcountTableClusters = rc.tableClusters;
    });
    return wrote;
  }

  /**
   * The slice of the active L2 table that maps `guest`, writable: the table allocated when
   * missing, copied when a snapshot shares it (L1 entry without COPIED). `create` false: null
   * instead of allocating. The caller holds the writer's lock.
   *
   * Either way the new table is written whole to its cluster here, before its L1 entry changes
   * (that entry reaches the disk at the next flush, after the refcounts and the L2 slices): its
   * other slices are then read from disk, so the cluster must hold the table's bytes and not what
   * a freed cluster held before. Nothing on disk names the cluster yet, so this write needs no
   * refcount before it. Only the slice asked for is cached.
   */
  /** Told after l2ForWrite allocated a table (the writer, for lazy refcounts: Qcow2Writer.tableAllocated). */
  afterTableAlloc: (() => Promise<void>) | undefined;

  async l2ForWrite(guest: number, create = true): Promise<CachedTable | null> {
    const g = this.image.geometry;
    const cs = g.clusterSize;
    const i = Math.floor(guest / g.l2Coverage);
    if (i >= this.entries) throw corrupt(`guest offset 0x${guest.toString(16)} is beyond the L1 table`);
    const off = l1TableOffset(this.l1Bytes, i);
    if (off === 0) {
      if (!create) return null;
      const at = await this.refcounts.allocClusters(1, 'L2 table');
      this.noteGrowth();
      await this.afterTableAlloc?.();
      await this.placeTable(at, new Uint8Array(cs));
      this.setL1Entry(i, at, true);
      return this.l2Cache.put(this.sliceAt(at, guest), new Uint8Array(this.slice.bytes), false);
    }
    if (off % cs !== 0) throw unalignedL2(off, i);
    if (off >= this.image.fileSize) throw corrupt(`L1 entry ${i}: L2 table offset 0x${off.toString(16)} is invalid`);
    if (l1EntryCopied(this.l1Bytes, i)) return this.l2Cache.getForWrite(this.sliceAt(off, guest));
    // Copy-on-write: the table as it stands (cached slices over the disk copy) to a new cluster;
    // the old table's slices leave the cache (a snapshot keeps the table on disk).
    const copy = await this.wholeTable(off);
    const at = await this.refcounts.allocClusters(1, 'L2 table');
    this.noteGrowth();
    await this.afterTableAlloc?.();
    await this.placeTable(at, copy);
    this.refcounts.free(off, cs, 'other');
    this.dropTable(off);
    this.setL1Entry(i, at, true);
    const from = this.sliceAt(at, guest);
    return this.l2Cache.put(from, copy.slice(from - at, from - at + this.slice.bytes), false);
  }

  /**
   * The L2 table at `offset`, whole, as it stands: the disk copy with its cached slices (newer
   * where dirty) over it. A copy: changes to it go nowhere.
   */
  async wholeTable(offset: number): Promise<Uint8Array> {
    const cs = this.image.clusterSize;
    const table = new Uint8Array(cs);
    await this.loadTable(offset, table);
    for (let s = 0; s < cs; s += this.slice.bytes) {
      const cached = this.l2Cache.cached(offset + s);
      if (cached) table.set(cached.data, s);
    }
    return table;
  }

  /** Forget every cached slice of the table at `offset` (freed, or its cluster reused); dirty ones unwritten. */
  dropTable(offset: number): void {
    for (let s = 0; s < this.image.clusterSize; s += this.slice.bytes) this.l2Cache.drop(offset + s);
  }

  /**
   * Write a new L2 table whole into its (just allocated) cluster `at`; slices of what it held
   * before leave the cache. When the write fails, the cluster is given back at once (nothing names
   * it yet), as QEMU's l2_allocate frees it.
   */
  private async placeTable(at: number, table: Uint8Array): Promise<void> {
    this.dropTable(at);
    this.image.store.debugEvent?.('l2_alloc_write');
    try {
      await this.image.store.write(at, table);
    } catch (e) {
      await this.refcounts.update(at, table.length, -1).catch(() => undefined);
      throw e;
    }
  }

  /**
   * Entry `i` of a cached table, decoded; a host offset that is not cluster aligned is kept as it
   * stands (the writer refuses to use it, `release` to free it, both in QEMU's words).
   */
  entry(t: CachedTable, i: number): ClusterDescriptor {
    return readL2Entry(t.data, i, this.image.l2Context, true);
  }

  /**
   * The corruption event of entry `i` of slice `t` naming a host cluster at the unaligned offset
   * `host`, in QEMU's words (its index is the entry's in the whole table).
   */
  unalignedCluster(t: CachedTable, i: number, host: number): CorruptionEvent {
    const cs = this.image.clusterSize;
    const l2Offset = t.offset - (t.offset % cs);
    const index = (t.offset - l2Offset) / this.image.geometry.l2EntryBytes + i;
    return new CorruptionEvent(`Cluster allocation offset 0x${host.toString(16)} unaligned (L2 offset: ${altHex(l2Offset)}, L2 index: ${altHex(index)})`);
  }

  /**
   * The corruption event of extended entry `i` of slice `t` whose subcluster bitmap contradicts
   * itself (l2EntryInvalid), in QEMU's words: its read path words it with two spaces before the
   * parenthesis, its write path with one.
   */
  invalidEntry(t: CachedTable, i: number, path: 'read' | 'write'): CorruptionEvent {
    const cs = this.image.clusterSize;
    const l2Offset = t.offset - (t.offset % cs);
    const index = (t.offset - l2Offset) / this.image.geometry.l2EntryBytes + i;
    return new CorruptionEvent(`Invalid cluster entry found ${path === 'read' ? ' ' : ''}(L2 offset: ${altHex(l2Offset)}, L2 index: ${altHex(index)})`);
  }

  /** Entry `i` of a cached table (the caller marks the table dirty with `tableChanged`). */
  setEntry(t: CachedTable, i: number, v: bigint, bitmap?: bigint): void {
    setL2Entry(t.data, i, this.image.geometry.l2EntryBytes, v, bitmap);
  }

  /** A table's entries changed in memory: it is written back at the next flush or on eviction. */
  tableChanged(t: CachedTable): Promise<unknown> | undefined {
    return this.l2Cache.changed(t);
  }

  /** Drop the reference an entry holds (deferred until its table is on disk), for `reason`. */
  release(d: ClusterDescriptor, reason: FreeReason): void {
    if (d.kind === 'compressed') this.refcounts.free(d.hostOffset, d.compressedBound, reason);
    else if ((d.kind === 'normal' || d.kind === 'zero-alloc') && !this.image.external) {
      const cs = this.image.clusterSize;
      // A cluster the entry names at an unaligned offset is not freed (it leaks, for a check to
      // find): a non-fatal corruption event, and the request goes on, as in QEMU.
      if (d.hostOffset % cs !== 0) this.image.corruption.nonFatal(new CorruptionEvent(`Cannot free unaligned cluster 0x${d.hostOffset.toString(16)}`));
      else this.refcounts.free(d.hostOffset, cs, reason);
    }
  }

  /**
   * Make whole clusters [from, to) read as zeros through metadata alone: v3 zero flags (keeping
   * the host cluster unless `unmap`), v2 deallocation (reached only when nothing shows through).
   * `hasBacking`: a missing table then does not read as zeros and must be made.
   */
  async zeroClusters(from: number, to: number, unmap: boolean, isDiscard: boolean, hasBacking: boolean): Promise<Array<[number, number]>> {
    const img = this.image;
    /** External data-file clusters unmapped (host offset, length): the writer decides whether to discard them there. */
    const dropped: Array<[number, number]> = [];
    const g = img.geometry;
    const cs = g.clusterSize;
    const v3 = img.header.version === 3;
    for (let pos = from; pos < to; ) {
      // Without a backing file, a missing table already reads as zeros: nothing to record.
      const table = await this.l2ForWrite(pos, hasBacking || (v3 && !isDiscard));
      if (!table) {
        pos = Math.min(to, (Math.floor(pos / g.l2Coverage) + 1) * g.l2Coverage);
        continue;
      }
      const sliceEnd = Math.min(to, this.sliceEnd(pos));
      // Entries that already say what they would be set to leave the table clean, as in QEMU
      // (no write-back, no l2_update for a zero write over zeros).
      const eb = g.l2EntryBytes;
      const firstIndex = this.sliceIndex(pos);
      // The last cluster may end past `to` (the image's last, partial cluster).
      const span = table.data.subarray(firstIndex * eb, (firstIndex + Math.ceil((sliceEnd - pos) / cs)) * eb);
      const before = span.slice();
      for (let c = pos; c < sliceEnd; c += cs) {
        const index = this.sliceIndex(c);
        const d = this.entry(table, index);
        // A discard leaves a cluster without data alone when nothing shows through (as qemu's
        // discard does): it already reads as zeros, and stays unallocated.
        if (isDiscard && !hasBacking && (d.kind === 'unallocated' || d.kind === 'zero-plain')) continue;
        if (img.external) {
          if (unmap && (d.kind === 'normal' || d.kind === 'zero-alloc')) {
            // Unmapped, as QEMU's discard does it: a zero entry without a host cluster, and the
            // data file's range handed to the writer.
            this.setEntry(table, index, standardL2Entry(0, { zero: !g.extendedL2 }), g.extendedL2 ? ALL_SUBCLUSTERS_ZERO : undefined);
            const last = dropped[dropped.length - 1];
            if (last && last[0] + last[1] === d.hostOffset) last[1] += cs;
            else dropped.push([d.hostOffset, cs]);
          } else if (d.kind === 'normal' || d.kind === 'zero-alloc') {
            // Without unmap, data-file clusters keep their mapping; the zero flag hides the bytes there.
            this.setEntry(table, index, standardL2Entry(d.hostOffset, { copied: true, zero: !g.extendedL2 }), g.extendedL2 ? ALL_SUBCLUSTERS_ZERO : undefined);
            if (img.dataFileRaw) await img.dataStore.write(c, new Uint8Array(cs));
          } else {
            this.setEntry(table, index, standardL2Entry(0, { zero: !g.extendedL2 }), g.extendedL2 ? ALL_SUBCLUSTERS_ZERO : undefined);
          }
          continue;
        }
        // Without unmap the host cluster stays, shared with a snapshot or not (QEMU keeps the
        // entry's offset and flags and adds the zero flag); a write there later copies it first.
        const keepHost = !unmap && (d.kind === 'normal' || d.kind === 'zero-alloc');
        if (!v3) {
          // v2 (only reached without a backing file): the cluster is deallocated.
          this.setEntry(table, index, 0n);
          this.release(d, 'request');
        } else if (g.extendedL2) {
          if (keepHost) this.setEntry(table, index, standardL2Entry(d.hostOffset, { copied: l2EntryCopied(d) }), ALL_SUBCLUSTERS_ZERO);
          else {
            this.setEntry(table, index, 0n, ALL_SUBCLUSTERS_ZERO);
            this.release(d, 'request');
          }
        } else if (keepHost) {
          this.setEntry(table, index, standardL2Entry(d.hostOffset, { copied: l2EntryCopied(d), zero: true }));
        } else {
          this.setEntry(table, index, standardL2Entry(0, { zero: true }));
          this.release(d, 'request');
        }
      }
      if (!sameBytes(before, span)) await this.tableChanged(table);
      pos = sliceEnd;
    }
    return dropped;
  }

  /**
   * Empty the entry of the cluster holding `guest` and drop its reference without passing the
   * free on to the file (a preallocation relinks that cluster elsewhere: QEMU frees the old host
   * cluster the same way, its blocks kept). The caller holds the writer's lock.
   */
  async unlinkCluster(guest: number): Promise<void> {
    const table = await this.l2ForWrite(guest, false);
    if (!table) return;
    const index = this.sliceIndex(guest);
    const d = this.entry(table, index);
    if (d.kind === 'unallocated') return;
    this.setEntry(table, index, 0n, this.image.geometry.extendedL2 ? 0n : undefined);
    this.release(d, 'never');
    await this.tableChanged(table);
  }

  /**
   * Deallocate every cluster of the active image so all of it reads from the backing image again
   * (qemu-img commit empties the overlay this way). Entries become 0, never zero flags, which
   * would hide the backing data; references are dropped through the usual deferred path.
   */
  async deallocateAll(): Promise<void> {
    const g = this.image.geometry;
    for (let i = 0; i < this.entries; i++) {
      if (l1TableOffset(this.l1Bytes, i) === 0) continue;
      // Slice by slice (the first call copies a shared table, the others find it COPIED).
      for (let s = i * g.l2Coverage; s < (i + 1) * g.l2Coverage; s += this.slice.coverage) {
        const table = (await this.l2ForWrite(s, false))!;
        let changed = false;
        for (let k = 0; k < this.slice.entries; k++) {
          if (l2EntryEmpty(table.data, k, g.l2EntryBytes)) continue;
          const d = this.entry(table, k);
          this.setEntry(table, k, 0n, g.extendedL2 ? 0n : undefined);
          this.release(d, 'snapshot');
          changed = true;
        }
        if (changed) await this.tableChanged(table);
      }
    }
  }

  /**
   * An L1 table of `need` entries, written whole at a new place (and its refcounts made durable
   * with `barrier`) but not yet named by the header: the caller writes the header, then takes the
   * table (replaceL1) and frees the old one (`oldOffset`). When a write fails here, the new
   * table's clusters are given back at once (nothing names them) and the active table stays.
   * Tells the store QEMU's events of an L1 growth (l1_grow_alloc_table, l1_grow_write_table; the
   * caller tells l1_grow_activate_table before the header write).
   */
  async growL1(need: number, barrier: () => Promise<void>): Promise<{ offset: number; l1: Uint8Array; oldOffset: number; oldEntries: number }> {
    // QEMU's words (its L1 growth fails with EFBIG), for a resize as for a VM state write.
    if (need * 8 > MAX_L1_BYTES) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Failed to grow the L1 table: File too large', { errno: 'EFBIG' });
    const old = { oldOffset: this.image.header.l1TableOffset, oldEntries: this.entries };
    const { store } = this.image;
    const l1 = new Uint8Array(need * 8);
    l1.set(this.l1Bytes);
    store.debugEvent?.('l1_grow_alloc_table');
    const at = await this.refcounts.allocClusters(Math.ceil(l1.length / this.image.clusterSize));
    try {
      store.debugEvent?.('l1_grow_write_table');
      await store.write(at, l1);
      await this.writeRefcounts(barrier);
      await store.flush();
    } catch (e) {
      // Best effort: the failure to report is the write's (a leak is all a failed undo leaves).
      await this.refcounts.update(at, l1.length, -1).catch(() => undefined);
      throw e;
    }
    return { offset: at, l1, ...old };
  }

  /**
   * Shrinking, step 2 (see write.ts resize): every cluster from the first whole cluster past
   * `size` on loses its reference from the active tables (shared L2 tables are copied first, so
   * snapshots keep their data), L1 entries past the end are emptied (the L1 table keeps its
   * length, as qemu keeps l1_size). References drop through the deferred path.
   */
  async dropPast(size: number, oldSize: number): Promise<void> {
    const g = this.image.geometry;
    const cs = g.clusterSize;
    const firstGone = Math.ceil(size / cs) * cs;
    const keptL1 = Math.ceil(size / g.l2Coverage);
    // The partly kept table: clear its entries past the end.
    if (keptL1 > 0 && firstGone < Math.min(oldSize, keptL1 * g.l2Coverage)) {
      const end = Math.min(keptL1 * g.l2Coverage, Math.ceil(oldSize / cs) * cs);
      for (let pos = firstGone; pos < end; ) {
        const table = await this.l2ForWrite(pos, false);
        if (!table) break;
        const sliceEnd = Math.min(end, this.sliceEnd(pos));
        for (let c = pos; c < sliceEnd; c += cs) {
          const k = this.sliceIndex(c);
          if (l2EntryEmpty(table.data, k, g.l2EntryBytes)) continue;
          const d = this.entry(table, k);
          this.setEntry(table, k, 0n, g.extendedL2 ? 0n : undefined);
          this.release(d, 'always');
        }
        await this.tableChanged(table);
        pos = sliceEnd;
      }
    }
    // Whole tables past the end: the active image's path to the table and to its data goes away
    // (the table itself and each data cluster lose one reference, shared with a snapshot or not).
    for (let i = keptL1; i < this.entries; i++) {
      const off = l1TableOffset(this.l1Bytes, i);
      if (off === 0) continue;
      const table = await this.wholeTable(off);
      for (let k = 0; k < g.l2Entries; k++) {
        if (l2EntryEmpty(table, k, g.l2EntryBytes)) continue;
        this.release(readL2Entry(table, k, this.image.l2Context), 'always');
      }
      this.dropTable(off);
      this.setL1Entry(i, 0, false);
      this.refcounts.free(off, cs, 'always');
    }
  }

  /** Shrinking, step 3: cut the file after the last cluster whose refcount is not zero. */
  async trimFile(): Promise<void> {
    const img = this.image;
    const cs = img.clusterSize;
    const rc = this.refcounts;
    let last = Math.max(rc.end, Math.ceil(img.fileSize / cs)) - 1;
    while (last > 0 && (await rc.get(last)) === 0) last--;
    const keep = (last + 1) * cs;
    const current = await img.store.size();
    if (keep < current) {
      await img.store.truncate(keep);
      await img.store.flush();
      img.setFileSize(keep);
    }
  }
}

/**
 * An L1 entry naming an L2 table at an unaligned offset, found when a request needs the table: a
 * corruption event, in QEMU's words (the image is marked corrupt when open read-write).
 */
function unalignedL2(offset: number, index: number): CorruptionEvent {
  return new CorruptionEvent(`L2 table offset 0x${offset.toString(16)} unaligned (L1 index: ${altHex(index)})`);
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
