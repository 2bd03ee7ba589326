/**
 * The host-cluster allocator of a QCOW2 image: refcounts in memory (table + the blocks touched so
 * far), free-space search, growth of the refcount table and blocks, and write-back.
 *
 * Crash safety is split between this module and its caller (the device), and rests on two rules:
 *   1. A refcount on disk is never lower than the number of on-disk references to its cluster.
 *      Increments are written back BEFORE the L2/L1 entries that use them (the caller writes us
 *      back first, with a barrier); decrements are only *recorded* (`free`) and applied by
 *      `applyPendingFrees()`, which the caller runs AFTER the tables that dropped the references
 *      are on disk. A freed cluster stays allocated in memory until then, so it cannot be handed
 *      out again while an on-disk table still points at it.
 *   2. On-disk pointers only ever point at written structures: a new refcount block is written
 *      (and flushed) before the table entry naming it; a relocated table is written whole and
 *      flushed before the header names it, and the old one is only freed afterwards.
 * A kill between any two writes therefore leaves at most clusters whose refcount is too high
 * (leaks), which `qemu-img check` reports as leaks and never as corruption.
 */
import { CorruptionEvent, QcowError, altHex, corrupt } from '../../core/errors.js';
import { firstNonZero, setU32, setU64 } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';
import { addRefcount, decodeRefcountTableInto, entriesPerBlock, getRefcount, maxRefcount, refcountsZero, setRefcount, setRefcountsToOne } from './refcount.js';
import { MAX_REFCOUNT_TABLE_BYTES } from './layout.js';
import { Lru } from '../../core/lru.js';
import { DEFAULT_DISCARD_PASSTHROUGH, passesDiscard, type DiscardPassthrough, type FreeReason } from './free-reason.js';

/** Where the header keeps the refcount table's location (offset u64 at 48, clusters u32 at 56). */
const HEADER_REFTABLE_FIELDS = 48;
/** qemu's limit on the refcount table (8 MiB). */
const MAX_REFTABLE_BYTES = MAX_REFCOUNT_TABLE_BYTES;

export interface RefcountsParams {
  clusterSize: number;
  refcountBits: number;
  tableOffset: number;
  tableClusters: number;
  /** Budget for cached refcount blocks (default 8 MiB, at least 8 blocks; see trimCache). */
  cacheBytes?: number;
}

const DEFAULT_REFCOUNT_CACHE_BYTES = 8 * 1024 * 1024;

export interface AllocatorHooks {
  /** Clusters the allocator must treat as in use although their refcount says 0 (repair). */
  inUse?: (clusterIndex: number) => boolean;
  /**
   * The overlap guard (overlap.ts, installed by the cluster map on a writable image): the message
   * QEMU gives when [offset, +bytes) may not be handed out (it holds metadata, or it is offset 0
   * for a structure named by `what`), else undefined. With it installed, cluster 0 is a candidate
   * like any other, as in QEMU's allocator: on a sound image its count keeps it taken, and on one
   * whose counts were zeroed the guard refuses it, with QEMU's message, where the old rule of
   * skipping it silently handed out the next metadata cluster instead.
   */
  vet?: (offset: number, bytes: number, what?: AllocPurpose) => string | QcowError | undefined;
}

/** What an allocation is for, where QEMU names it in "Preventing invalid allocation of ... at offset 0". */
export type AllocPurpose = 'L2 table' | 'refcount block' | 'compressed cluster';

/**
 * What the cluster map, the writer, snapshots and amend use of the allocator. `Refcounts` is the
 * real one; tests of the write path may give a small fake (see test/formats/qcow2/write-path.test.ts).
 */
export interface Allocator {
  /**
   * `n` contiguous free clusters with refcount 1; their host offset. `what` names the structure
   * they are for (the overlap guard's message when it refuses offset 0).
   */
  allocClusters(n: number, what?: AllocPurpose): Promise<number>;
  /**
   * allocClusters when it can be done at once, without I/O (the common case of an image growing
   * at its end); -1 when the caller must use allocClusters. Optional: a fake may leave it out.
   */
  allocClustersNow?(n: number): number;
  /**
   * `n` clusters at exactly `offset`, refcount 1, if all of them are free (true); else nothing
   * changes (false). Optional: a fake may leave it out.
   */
  allocClustersAt?(offset: number, n: number, what?: AllocPurpose): Promise<boolean>;
  /** Room for one compressed cluster of `size` bytes (packed at byte granularity). */
  allocBytes(size: number): Promise<number>;
  /** Undo allocBytes(size), which returned `offset`, its bytes never named (optional: a fake may leave it out). */
  unallocBytes?(offset: number, size: number): Promise<void>;
  /**
   * References to [offset, +length) are gone from memory: counts drop at applyPendingFrees.
   * `reason` (default 'other') decides whether a cluster left unreferenced is punched (free-reason.ts).
   */
  free(offset: number, length: number, reason?: FreeReason): void;
  /** Add `delta` to the count of every cluster touching [offset, +length) (all or nothing). */
  update(offset: number, length: number, delta: number): Promise<void>;
  get(cluster: number): Promise<number>;
  /** How QEMU's refcount update fails to free `cluster`, in its errno's words (see Refcounts). */
  whyFreeFails?(cluster: number): Promise<string | undefined>;
  /** The count when it is known without I/O, else undefined. */
  peek(cluster: number): number | undefined;
  /** Frees are recorded and not applied yet. */
  readonly hasPendingFrees: boolean;
  /** Apply recorded frees (after the tables that dropped them are on disk); true if any. */
  applyPendingFrees(): Promise<boolean>;
  /**
   * Runs [offset, length] whose count the last applyPendingFrees brought to zero, for frees whose
   * reason passes discards on (and that takeUnreferenced did not report already).
   */
  readonly freedRuns: ReadonlyArray<[number, number]>;
  /**
   * Runs of clusters that the frees recorded since the last call leave with no reference once
   * applied (for frees whose reason passes discards on): QEMU punches those at once. They are not
   * in freedRuns again. Optional: a fake may leave it out.
   */
  takeUnreferenced?(): Promise<Array<[number, number]>>;
  /** The open's pass-discard-* options (optional: a fake may leave it out). */
  setDiscardPassthrough?(p: DiscardPassthrough): void;
  /**
   * Run `step`, which drops counts at once (update with a negative delta: deleting a snapshot),
   * and return the runs of clusters it brought to zero when `reason` passes discards on.
   */
  collectFreedBy?(reason: FreeReason, step: () => Promise<void>): Promise<Array<[number, number]>>;
  /** Write counts back, `barrier` where a later write must not overtake an earlier one; true if any. */
  writeBack(barrier: () => Promise<void>): Promise<boolean>;
  /** First cluster index at or above every allocation. */
  readonly end: number;
  readonly tableOffset: number;
  readonly tableClusters: number;
  blockOffsets(): ArrayLike<number>;
  /** Refcount blocks held in memory (for tests of the cache budget). */
  readonly cachedBlocks: number;
  /** Whether `cluster` holds a refcount block (the overlap guard asks; a fake may leave it out). */
  isRefcountBlock?(cluster: number): boolean;
  /** A cluster index above every refcount block (an upper bound; optional, see isRefcountBlock). */
  refcountBlocksEnd?(): number;
  /** Install the overlap guard (see AllocatorHooks.vet; a fake may leave it out). */
  setOverlapGuard?(vet: NonNullable<AllocatorHooks['vet']>): void;
  /** Drop the refcount blocks that count nothing (a shrink; see Refcounts). Optional for fakes. */
  dropUnusedBlocks?(): Promise<void>;
  /** A new refcount table and blocks at `start` for a large preallocation (see Refcounts). Optional for fakes. */
  refcountArea?(start: number, additional: number): Promise<number>;
  /** Data allocations take these counted clusters in order until `n` is 0 (see Refcounts). Optional for fakes. */
  steerData?(offset: number, n: number): void;
}

export class Refcounts implements Allocator {
  readonly clusterSize: number;
  readonly refcountBits: number;
  readonly maxRefcount: number;
  /** Clusters one refcount block describes. */
  readonly perBlock: number;
  tableOffset: number;
  tableClusters: number;
  /** Block offset per table entry (0 = none): a typed array, see decodeRefcountTableInto. */
  private table: Float64Array;
  /**
   * Cached blocks by table index (core/lru.ts: recency, merged loads). The policy: a dirty block is
   * never evicted, it stays until written (writeBack, or spillDirtyBlocks).
   */
  private readonly blocks: Lru<number, Uint8Array>;
  private readonly maxBlocks: number;
  private readonly dirtyBlocks = new Set<number>();
  /** Blocks never written yet: the table entry naming them must wait for a barrier. */
  private readonly newBlocks = new Set<number>();
  private readonly dirtyTableEntries = new Set<number>();
  /** Set when the table moved: the old location, freed once the header names the new one. */
  private movedFrom: { offset: number; clusters: number } | null = null;
  /**
   * Byte ranges whose references are gone from memory but maybe not yet from disk; `punch`: a
   * cluster this leaves unreferenced is to be punched (its reason passes discards on, and
   * takeUnreferenced has not looked at it yet).
   */
  private pendingFrees: Array<{ offset: number; length: number; punch: boolean }> = [];
  /** Per cluster touched by pendingFrees: how many of them touch it, and the last one's index. */
  private readonly pendingPerCluster = new Map<number, { count: number; last: number }>();
  /** pendingFrees from here on have not been looked at by takeUnreferenced. */
  private firstUnchecked = 0;
  private passthrough: Readonly<DiscardPassthrough> = DEFAULT_DISCARD_PASSTHROUGH;
  private readonly reserved: Array<[number, number]> = [];
  /** Lowest cluster index that may be free. */
  private freeHint = 0;
  /** One past the highest cluster known to be used or present in the file. */
  private endCluster: number;
  /** Where the next compressed cluster goes (0: start a new host cluster). */
  private freeByteOffset = 0;
  hooks: AllocatorHooks = {};

  private constructor(
    private readonly store: ByteStore,
    p: RefcountsParams,
    table: Float64Array,
    fileSize: number,
  ) {
    this.clusterSize = p.clusterSize;
    this.refcountBits = p.refcountBits;
    this.maxRefcount = maxRefcount(p.refcountBits);
    this.perBlock = entriesPerBlock(p.clusterSize, p.refcountBits);
    this.tableOffset = p.tableOffset;
    this.tableClusters = p.tableClusters;
    this.table = table;
    this.endCluster = Math.ceil(fileSize / p.clusterSize);
    this.maxBlocks = Math.max(8, Math.floor((p.cacheBytes ?? DEFAULT_REFCOUNT_CACHE_BYTES) / p.clusterSize));
    this.blocks = new Lru({ budget: this.maxBlocks, canEvict: (b) => !this.dirtyBlocks.has(b) });
  }

  static async load(store: ByteStore, p: RefcountsParams): Promise<Refcounts> {
    const bytes = p.tableClusters * p.clusterSize;
    if (bytes > MAX_REFTABLE_BYTES * 4) throw corrupt(`refcount table of ${p.tableClusters} clusters is too large`);
    const buf = new Uint8Array(bytes);
    await store.read(p.tableOffset, buf);
    const table = decodeRefcountTableInto(new Float64Array(bytes / 8), buf, bytes / 8, p.clusterSize, { unalignedLater: true });
    return new Refcounts(store, p, table, await store.size());
  }

  /** True while something is waiting to be written back. */
  get dirty(): boolean {
    return this.dirtyBlocks.size > 0 || this.dirtyTableEntries.size > 0 || this.movedFrom !== null;
  }

  get hasPendingFrees(): boolean {
    return this.pendingFrees.length > 0;
  }

  /** Offsets of every refcount block (index = table entry). */
  blockOffsets(): ArrayLike<number> {
    return this.table;
  }

  /** A cluster's refcount when its block is cached (or absent: 0); undefined when it must be read. */
  peek(cluster: number): number | undefined {
    const b = Math.floor(cluster / this.perBlock);
    if (b >= this.table.length || this.table[b] === 0) return 0;
    const block = this.blocks.peek(b);
    return block ? getRefcount(block, cluster % this.perBlock, this.refcountBits) : undefined;
  }

  async get(cluster: number): Promise<number> {
    const b = Math.floor(cluster / this.perBlock);
    if (b >= this.table.length || this.table[b] === 0) return 0;
    const block = await this.loadBlock(b);
    return getRefcount(block, cluster % this.perBlock, this.refcountBits);
  }

  /**
   * How QEMU's refcount update fails to drop the count of `cluster` by one, in its errno's words
   * (the "qcow2_free_clusters failed" warning), or undefined when it would not fail: past the
   * reach of the refcount table, "File too large"; with no refcount block there yet (QEMU then
   * allocates one first, which we do not), "Resource temporarily unavailable"; at a count of 0,
   * "Invalid argument". Looks only: nothing changes.
   */
  async whyFreeFails(cluster: number): Promise<string | undefined> {
    const b = Math.floor(cluster / this.perBlock);
    if (b >= this.table.length) return 'File too large';
    if (this.table[b] === 0) return 'Resource temporarily unavailable';
    return (await this.get(cluster)) === 0 ? 'Invalid argument' : undefined;
  }

  /** Set a cluster's refcount, creating its block when needed (repair, rebuild). */
  async set(cluster: number, value: number): Promise<void> {
    if (value === 0 && (await this.get(cluster)) === 0) return;
    const b = Math.floor(cluster / this.perBlock);
    const block = await this.ensureBlock(b);
    setRefcount(block, cluster % this.perBlock, this.refcountBits, value);
    this.dirtyBlocks.add(b);
    if (value === 0) this.noteFreed(cluster);
    else this.noteUsed(cluster, 1);
  }

  /** Add `delta` (may be negative: only for repair and rollback) to every cluster touching [offset, offset+length). */
  async update(offset: number, length: number, delta: number): Promise<void> {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    // Checked whole before anything changes: a range that would overflow (or drop below zero)
    // anywhere changes nothing, so callers can undo what they did before it, range by range.
    for (const apply of [false, true]) {
      for (let c = first; c <= last; ) {
        // One block at a time: obtained once, then its clusters looked at in one synchronous step.
        const b = Math.floor(c / this.perBlock);
        if (!apply) this.tellBlockLookup(b);
        const block = await this.ensureBlock(b);
        const blockEnd = Math.min(last + 1, (b + 1) * this.perBlock);
        if (apply) this.dirtyBlocks.add(b);
        // A fresh run gaining its first reference (what every claim of a growing image is): no
        // count can overflow, each becomes 1, and noting the run's end is noteUsed per cluster.
        // One scan and one fill instead of two calls per cluster: with 4 KiB clusters a convert
        // claims hundreds of clusters here per item, and the loop made V8 optimise this function.
        if (delta === 1 && refcountsZero(block, c % this.perBlock, blockEnd - c, this.refcountBits)) {
          if (apply) {
            setRefcountsToOne(block, c % this.perBlock, blockEnd - c, this.refcountBits);
            this.noteUsed(c, blockEnd - c);
          }
          c = blockEnd;
          continue;
        }
        for (; c < blockEnd; c++) {
          // Exact at every width: a 64-bit count past 2^53 is added to as a BigInt.
          const v = addRefcount(block, c % this.perBlock, this.refcountBits, delta, apply);
          if (v === 'underflow') throw corrupt(`refcount of cluster 0x${(c * this.clusterSize).toString(16)} would drop below zero`);
          if (v === 'overflow') throw new QcowError('QCOW_UNSUPPORTED', `Refcount overflow on cluster 0x${(c * this.clusterSize).toString(16)} (refcount_bits=${this.refcountBits})`);
          if (!apply) continue;
          if (v === 0) this.noteFreed(c);
          else this.noteUsed(c, 1);
        }
      }
    }
  }

  /** Allocate `n` contiguous free clusters with refcount 1; returns the host offset. */
  allocClustersNow(n: number): number {
    if (this.steered) {
      const steered = this.takeSteered(n);
      if (steered !== -1) return steered;
    }
    const at = this.allocAtHint(n);
    if (at === -1) return -1; // the caller goes on to allocClusters (which tells the store)
    this.store.debugEvent?.('cluster_alloc');
    this.tellBlockLookup(Math.floor(at / this.perBlock));
    return at * this.clusterSize;
  }

  async allocClusters(n: number, what?: AllocPurpose): Promise<number> {
    if (this.steered && what === undefined) {
      const steered = this.takeSteered(n);
      if (steered !== -1) return steered;
    }
    this.store.debugEvent?.('cluster_alloc');
    return this.allocClustersUntold(n, what);
  }

  /**
   * allocClusters without its cluster_alloc event: QEMU's byte allocator (compressed clusters)
   * takes its clusters through the allocator's inner search, which does not raise it.
   */
  private async allocClustersUntold(n: number, what?: AllocPurpose): Promise<number> {
    const at = this.allocAtHint(n, what);
    if (at !== -1) {
      this.tellBlockLookup(Math.floor(at / this.perBlock));
      return at * this.clusterSize;
    }
    await this.spillDirtyBlocks();
    const start = await this.findFree(n);
    // QEMU counts the clusters before its caller looks at where they are: a refcount block they
    // need is made (and refused, with its own message) before the clusters are.
    await this.withReserved(start, n, () => this.ensureBlocks(start, n));
    this.vet(start, n, what);
    await this.claim(start, n);
    return start * this.clusterSize;
  }

  /**
   * allocClusters' common case, in one synchronous step: the `n` clusters at the free hint are free
   * and described by one block that is cached (an image growing at its end, a convert, allocating
   * guest writes). Exactly what findFree + claim would do there, without the dozen awaits they
   * take per allocation; -1 when anything else applies (then the general path decides).
   */
  private allocAtHint(n: number, what?: AllocPurpose): number {
    if (this.reserved.length > 0 || this.hooks.inUse !== undefined || this.dirtyBlocks.size > this.maxBlocks) return -1;
    const start = this.firstCandidate();
    const b = Math.floor(start / this.perBlock);
    if (Math.floor((start + n - 1) / this.perBlock) !== b || b >= this.table.length || this.table[b] === 0) return -1;
    if (!Number.isSafeInteger((start + n) * this.clusterSize)) return -1;
    const block = this.blocks.get(b);
    if (!block) return -1;
    const first = start - b * this.perBlock;
    if (!refcountsZero(block, first, n, this.refcountBits)) return -1;
    // A refused range is left to the general path, which throws (this one must not: see allocClustersNow).
    if (this.hooks.vet?.(start * this.clusterSize, n * this.clusterSize, what) !== undefined) return -1;
    setRefcountsToOne(block, first, n, this.refcountBits);
    this.dirtyBlocks.add(b);
    this.noteUsed(start, n);
    this.freeHint = start + n;
    return start;
  }

  /** Allocate exactly [offset, offset + n clusters) if all of it is free; false otherwise. */
  async allocClustersAt(offset: number, n: number, what?: AllocPurpose): Promise<boolean> {
    const start = offset / this.clusterSize;
    for (let c = start; c < start + n; c++) if (!(await this.isFree(c))) return false;
    await this.withReserved(start, n, () => this.ensureBlocks(start, n)); // as in allocClusters
    this.vet(start, n, what);
    await this.claim(start, n);
    return true;
  }

  /**
   * Room for one compressed cluster of `size` bytes, packed after the previous one at byte
   * granularity as qemu packs them. Every host cluster the bytes touch gets one more reference.
   */
  async allocBytes(size: number): Promise<number> {
    const cs = this.clusterSize;
    if (size <= 0 || size > cs) throw new QcowError('QCOW_INVALID_ARGUMENT', `compressed size ${size} is not in 1..${cs}`);
    this.store.debugEvent?.('cluster_alloc_bytes');
    let off = this.freeByteOffset;
    if (off !== 0) {
      const cluster = Math.floor(off / cs);
      const endCluster = Math.floor((off + size - 1) / cs);
      // Share the current host cluster unless its counter is full or the next one is taken.
      const ok = (await this.get(cluster)) < this.maxRefcount && (endCluster === cluster || (await this.allocClustersAt(endCluster * cs, 1, 'compressed cluster')));
      if (ok) await this.update(cluster * cs, 1, 1);
      else off = 0;
    }
    if (off === 0) off = await this.allocClustersUntold(1, 'compressed cluster');
    this.freeByteOffset = (off + size) % cs === 0 ? 0 : off + size;
    return off;
  }

  /**
   * Undo allocBytes(size), which returned `offset`, when nothing names those bytes (their write
   * failed): every host cluster they touch loses the reference allocBytes gave it, at once (no
   * table on disk can name them), and the next compressed cluster is packed at `offset` again
   * when its host cluster still holds earlier compressed data. The caller holds the writer's
   * lock: nothing was allocated in between.
   */
  async unallocBytes(offset: number, size: number): Promise<void> {
    await this.update(offset, size, -1);
    const first = Math.floor(offset / this.clusterSize);
    // A host cluster freed whole took freeByteOffset with it (noteFreed); a shared one keeps room.
    if ((await this.get(first)) > 0) this.freeByteOffset = offset;
  }

  /**
   * Record that the references to the clusters touching [offset, offset+length) are gone. The
   * counts drop when the caller has written the tables that dropped them (applyPendingFrees).
   */
  free(offset: number, length: number, reason: FreeReason = 'other'): void {
    if (length <= 0) return;
    const index = this.pendingFrees.length;
    this.pendingFrees.push({ offset, length, punch: passesDiscard(this.passthrough, reason) });
    const cs = this.clusterSize;
    for (let c = Math.floor(offset / cs); c <= Math.floor((offset + length - 1) / cs); c++) {
      const seen = this.pendingPerCluster.get(c);
      if (seen) {
        seen.count++;
        seen.last = index;
      } else this.pendingPerCluster.set(c, { count: 1, last: index });
    }
  }

  setDiscardPassthrough(p: DiscardPassthrough): void {
    this.passthrough = { ...p };
  }

  /**
   * QEMU drops a count the moment a reference goes and punches the cluster when it reaches zero;
   * here the drop waits for the tables (applyPendingFrees), but whether it will reach zero is
   * known now: the count equals the number of pending frees touching the cluster. A cluster is
   * reported by the free that will bring it to zero (the last pending one touching it), so the
   * reason of that free decides, as in QEMU. Safe to punch before the tables are written: the
   * cluster cannot be handed out again before applyPendingFrees, and a crash before that leaves
   * a table pointing at a cluster that reads as zeros, which the discard allowed.
   */
  async takeUnreferenced(): Promise<Array<[number, number]>> {
    const runs: Array<[number, number]> = [];
    const cs = this.clusterSize;
    for (let i = this.firstUnchecked; i < this.pendingFrees.length; i++) {
      const f = this.pendingFrees[i]!;
      if (!f.punch) continue;
      f.punch = false;
      for (let c = Math.floor(f.offset / cs); c <= Math.floor((f.offset + f.length - 1) / cs); c++) {
        const seen = this.pendingPerCluster.get(c)!;
        if (seen.last !== i || (await this.get(c)) !== seen.count) continue;
        const last = runs[runs.length - 1];
        if (last && last[0] + last[1] === c * cs) last[1] += cs;
        else runs.push([c * cs, cs]);
      }
    }
    this.firstUnchecked = this.pendingFrees.length;
    return runs;
  }

  /**
   * Apply recorded frees to the in-memory counts. Returns true when any were applied. The clusters
   * whose count reached zero are left in `freedRuns` (as [offset, length] runs) until the next
   * call, for the caller to give their host blocks back before anything can reuse them.
   */
  async applyPendingFrees(): Promise<boolean> {
    this.freedRuns = [];
    if (this.pendingFrees.length === 0) return false;
    const list = this.pendingFrees;
    this.pendingFrees = [];
    this.pendingPerCluster.clear();
    this.firstUnchecked = 0;
    try {
      for (const f of list) {
        this.collectFreed = f.punch;
        await this.update(f.offset, f.length, -1);
      }
    } finally {
      this.collectFreed = false;
    }
    return true;
  }

  async collectFreedBy(reason: FreeReason, step: () => Promise<void>): Promise<Array<[number, number]>> {
    const saved = this.freedRuns;
    this.freedRuns = [];
    this.collectFreed = passesDiscard(this.passthrough, reason);
    try {
      await step();
      return this.freedRuns;
    } finally {
      this.collectFreed = false;
      this.freedRuns = saved;
    }
  }

  /** Clusters freed by the last applyPendingFrees, merged into [offset, length] runs. */
  freedRuns: Array<[number, number]> = [];
  private collectFreed = false;

  /**
   * Write dirty blocks and table changes. `barrier` makes earlier writes durable; it runs only
   * where a later write would otherwise point at data that might not be on disk yet. The caller
   * holds the writer's lock (flush, an L2 write-back, snapshots, amend): nothing allocates while
   * this runs, which is why the dirty marks may be cleared once the writes are done. (An
   * allocation in the meantime, a lock-free guest write, would lose its mark with them and its
   * count would never reach the disk.)
   */
  async writeBack(barrier: () => Promise<void>): Promise<boolean> {
    if (!this.dirty) return false;
    const cs = this.clusterSize;
    for (const b of [...this.dirtyBlocks].sort((x, y) => x - y)) await this.writeBlock(b);
    // The marks are cleared only once the new blocks are durable: a barrier that failed is run
    // again by the next write-back, before any table entry names them.
    if (this.newBlocks.size > 0) await barrier();
    const hookedUp = [...this.newBlocks].some((b) => b < this.oldTableReach());
    this.dirtyBlocks.clear();
    this.newBlocks.clear();
    if (this.movedFrom) {
      // QEMU hooks a block up in the table it has while there is room, and moves the table only
      // when there is none; here the moved table's write hooks up every block made since.
      if (hookedUp) this.store.debugEvent?.('refblock_alloc_hookup');
      this.store.debugEvent?.('refblock_alloc_write_table');
      await this.store.write(this.tableOffset, this.encodeTable(0, this.table.length));
      await barrier();
      const fields = new Uint8Array(12);
      setU64(fields, 0, this.tableOffset);
      setU32(fields, 8, this.tableClusters);
      this.store.debugEvent?.('refblock_alloc_switch_table');
      await this.store.write(HEADER_REFTABLE_FIELDS, fields);
      const old = this.movedFrom;
      this.movedFrom = null;
      this.dirtyTableEntries.clear();
      // The old table is unreferenced once the header write lands; free it after a barrier.
      await barrier();
      await this.update(old.offset, old.clusters * cs, -1);
      for (const b of [...this.dirtyBlocks].sort((x, y) => x - y)) await this.writeBlock(b);
      this.dirtyBlocks.clear();
    } else if (this.dirtyTableEntries.size > 0) {
      if (hookedUp) this.store.debugEvent?.('refblock_alloc_hookup');
      const entries = [...this.dirtyTableEntries].sort((x, y) => x - y);
      // Write runs of neighbouring entries in one call each.
      for (let i = 0; i < entries.length; ) {
        let j = i;
        while (j + 1 < entries.length && entries[j + 1] === entries[j]! + 1) j++;
        await this.store.write(this.tableOffset + entries[i]! * 8, this.encodeTable(entries[i]!, entries[j]! + 1));
        i = j + 1;
      }
      this.dirtyTableEntries.clear();
    }
    this.trimCache();
    return true;
  }

  /** Blocks held in memory now (for tests of the budget). */
  get cachedBlocks(): number {
    return this.blocks.size;
  }

  /**
   * Keep the cache within its budget while a long run of allocations dirties block after block
   * (only writeBack, at a flush, would otherwise clean them): write the dirty blocks' data, then
   * drop the least recently used. Writing a block early is always safe: its in-memory counts are
   * never below what the tables on disk reference (decrements wait for applyPendingFrees, after
   * the tables), so at worst clusters leak. Table entries of new blocks still wait for writeBack
   * and its barrier. Called only at the start of an allocation, where no block is held.
   */
  private async spillDirtyBlocks(): Promise<void> {
    if (this.dirtyBlocks.size <= this.maxBlocks) return;
    for (const b of [...this.dirtyBlocks].sort((x, y) => x - y)) await this.writeBlock(b);
    this.dirtyBlocks.clear();
    this.trimCache();
  }

  /**
   * Tell the store that a refcount update looks up the block of table entry `b`, as QEMU's does
   * (alloc_refcount_block: refblock_alloc, then refblock_load when the block exists, cached or
   * not). A plain look at a count (free-space search, get) tells nothing, as in QEMU.
   */
  private tellBlockLookup(b: number): void {
    const store = this.store;
    if (!store.debugEvent) return;
    store.debugEvent('refblock_alloc');
    if (b < this.table.length && this.table[b] !== 0) store.debugEvent('refblock_load');
  }

  /**
   * Entries the table on disk has room for: past them, a new block needs the moved table (the
   * blocks QEMU makes for a grown table itself, refblock_alloc_write_blocks).
   */
  private oldTableReach(): number {
    return this.movedFrom ? (this.movedFrom.clusters * this.clusterSize) / 8 : Infinity;
  }

  /**
   * Write refcount block `b` back. QEMU's refcount cache tells its file refblock_update_part; a
   * block never written yet is one QEMU writes as it makes it, and says so first.
   */
  private writeBlock(b: number): Promise<void> {
    if (this.newBlocks.has(b)) this.store.debugEvent?.(b < this.oldTableReach() ? 'refblock_alloc_write' : 'refblock_alloc_write_blocks');
    this.store.debugEvent?.('refblock_update_part');
    return this.store.write(this.table[b]!, this.blocks.peek(b)!);
  }

  /**
   * Drop least recently used clean blocks beyond the budget (dirty ones stay until written, and
   * `keep`, the block being handed out). Synchronous, and every caller changes a block in the same
   * synchronous step that obtained it, so a block cannot be dropped between the two.
   */
  private trimCache(keep?: number): void {
    this.blocks.trim(keep);
  }

  /**
   * QEMU's room for a large preallocation (qcow2_refcount_area, exact size): a new refcount table,
   * sized for the clusters below `start` + `additional` and for the refcount structures
   * themselves, goes to cluster `start`, after the refcount blocks it needs that do not exist yet;
   * every cluster of this area counts 1. The next write-back writes the blocks, then the table,
   * then the header, and frees the old table (so its cluster is free for what comes next, as in
   * QEMU). Nothing may wait to be written on entry, and nothing may be counted at or after
   * `start`. Returns the first cluster after the area.
   */
  async refcountArea(start: number, additional: number): Promise<number> {
    if (this.dirty || this.pendingFrees.length > 0) throw new Error('refcountArea with refcounts not written back');
    const cs = this.clusterSize;
    const perCluster = cs / 8;
    // The fixed point where the blocks and table clusters cover the clusters and themselves.
    const clusters = start + additional;
    let blocks = 0;
    let tableClusters = 0;
    for (let n = -1, last = 0; n !== last; ) {
      last = n;
      blocks = Math.ceil((clusters + tableClusters + blocks) / this.perBlock);
      tableClusters = Math.ceil(blocks / perCluster);
      n = clusters + blocks + tableClusters;
    }
    if (tableClusters * cs > MAX_REFTABLE_BYTES) throw new QcowError('QCOW_UNSUPPORTED', 'refcount table would exceed 8 MiB: the image is too large for its cluster size');
    const entries = tableClusters * perCluster;
    const table = new Float64Array(entries);
    table.set(this.table.subarray(0, entries));
    const first = Math.floor(start / this.perBlock);
    let missing = 0;
    for (let b = first; b < blocks; b++) if (table[b] === 0) missing++;
    const tableAt = start + missing;
    const end = tableAt + tableClusters;
    if (!Number.isSafeInteger(end * cs)) throw new QcowError('QCOW_UNSUPPORTED', 'image file would grow beyond 2^53 bytes');
    this.movedFrom = { offset: this.tableOffset, clusters: this.tableClusters };
    this.table = table;
    this.tableOffset = tableAt * cs;
    this.tableClusters = tableClusters;
    let blockAt = start;
    for (let b = first; b < blocks; b++) {
      let block: Uint8Array;
      if (table[b] !== 0) block = await this.loadBlock(b);
      else {
        block = new Uint8Array(cs);
        table[b] = blockAt * cs;
        this.blockClusters?.add(blockAt);
        blockAt++;
        this.dirtyBlocks.add(b);
        this.blocks.set(b, block);
        this.newBlocks.add(b);
      }
      const covered = b * this.perBlock;
      if (covered >= end) continue;
      for (let c = Math.max(start, covered); c < Math.min(end, covered + this.perBlock); c++) {
        if (getRefcount(block, c - covered, this.refcountBits) !== 0) throw corrupt(`cluster 0x${(c * cs).toString(16)} past the last used one has a refcount`);
        setRefcount(block, c - covered, this.refcountBits, 1);
      }
      this.dirtyBlocks.add(b);
    }
    this.noteUsed(start, end - start);
    if (this.freeHint >= start && this.freeHint < end) this.freeHint = end;
    return end;
  }

  /**
   * Hand the clusters [offset, +n clusters), counted already (allocClustersAt), to the data
   * allocations that follow, in order, instead of searching (QEMU's preallocation links its data
   * clusters where it counted them); table allocations still search. Ends when they are used up.
   */
  steerData(offset: number, n: number): void {
    this.steered = n > 0 ? { next: offset / this.clusterSize, end: offset / this.clusterSize + n } : undefined;
  }

  private steered: { next: number; end: number } | undefined;

  /** The next `n` steered clusters' offset; -1 (steering ends) when fewer are left. */
  private takeSteered(n: number): number {
    const s = this.steered!;
    if (s.next + n > s.end) {
      this.steered = undefined;
      return -1;
    }
    const at = s.next;
    s.next += n;
    if (s.next === s.end) this.steered = undefined;
    return at * this.clusterSize;
  }

  /** First cluster index at or above every allocation (used to place new structures at the end). */
  get end(): number {
    return this.endCluster;
  }

  /**
   * Drop every refcount block that counts nothing but, maybe, itself (QEMU's shrink does this,
   * qcow2_shrink_reftable): the table is written at once without them, then each one's own count
   * goes to 0 in the block that covers it. The metadata must be written back on entry. A block
   * the table places at an unaligned offset, or one no block covers, is a corruption event (the
   * table may then already be written without the unused blocks, as QEMU leaves it).
   */
  async dropUnusedBlocks(): Promise<void> {
    const cs = this.clusterSize;
    const unused: number[] = [];
    for (let i = 0; i < this.table.length; i++) {
      const off = this.table[i]!;
      if (off === 0) continue;
      if (off % cs !== 0) throw new CorruptionEvent(`Cannot get entry from refcount block cache: Offset ${altHex(off)} is unaligned`);
      const block = await this.loadBlock(i);
      const own = Math.floor(off / cs / this.perBlock) === i ? (off / cs) % this.perBlock : -1;
      const ownCount = own < 0 ? 0 : getRefcount(block, own, this.refcountBits);
      if (own >= 0) setRefcount(block, own, this.refcountBits, 0);
      const empty = refcountsZero(block, 0, this.perBlock, this.refcountBits);
      if (own >= 0) setRefcount(block, own, this.refcountBits, ownCount);
      if (empty) unused.push(i);
    }
    if (unused.length === 0) return;
    const written = this.encodeTable(0, this.table.length);
    for (const i of unused) written.fill(0, i * 8, i * 8 + 8);
    await this.store.write(this.tableOffset, written);
    await this.store.flush();
    let failure: CorruptionEvent | undefined;
    for (const i of unused) {
      const off = this.table[i]!;
      if (!failure) failure = await this.dropBlockCount(off);
      this.table[i] = 0;
      this.blocks.delete(i);
      this.dirtyBlocks.delete(i);
      this.blockClusters?.delete(off / cs);
    }
    if (failure) throw failure;
  }

  /** The count of the refcount block at `off` goes to 0 (dropUnusedBlocks); the event if it cannot. */
  private async dropBlockCount(off: number): Promise<CorruptionEvent | undefined> {
    const cluster = off / this.clusterSize;
    const b = Math.floor(cluster / this.perBlock);
    if (b >= this.table.length || this.table[b] === 0) return new CorruptionEvent(`Refblock at ${altHex(off)} is not covered by the refcount structures`);
    const covering = await this.loadBlock(b);
    const count = getRefcount(covering, cluster % this.perBlock, this.refcountBits);
    if (count !== 1) {
      return new CorruptionEvent(`Invalid refcount: refblock offset ${altHex(this.table[b]!)}, reftable index ${b}, block offset ${altHex(off)}, refcount ${altHex(count)}`);
    }
    setRefcount(covering, cluster % this.perBlock, this.refcountBits, 0);
    this.dirtyBlocks.add(b);
    if (cluster < this.freeHint) this.freeHint = cluster;
    return undefined;
  }

  // --- internals -------------------------------------------------------------------------------

  private encodeTable(from: number, to: number): Uint8Array {
    const out = new Uint8Array((to - from) * 8);
    for (let i = from; i < to; i++) setU64(out, (i - from) * 8, this.table[i]!);
    return out;
  }

  private async loadBlock(b: number): Promise<Uint8Array> {
    const hit = this.blocks.get(b); // most recently used now
    if (hit) return hit;
    const off = this.table[b]!;
    if (off === 0) throw new Error('loadBlock without a block');
    if (off % this.clusterSize !== 0) throw new CorruptionEvent(`Refblock offset 0x${off.toString(16)} unaligned (reftable index: ${altHex(b)})`);
    // Concurrent readers of one block share one read; a block set meanwhile (made, changed) wins
    // over the one read. The loaded block is not evicted by its own insertion.
    return this.blocks.load(b, async () => {
      const block = new Uint8Array(this.clusterSize);
      // A block the table places past the end of the file (a corrupt entry) reads as zeros, as
      // QEMU reads it; one there because it was made this session is cached, not loaded.
      const inFile = Math.max(0, Math.min(this.clusterSize, this.endCluster * this.clusterSize - off));
      if (inFile > 0) await this.store.read(off, block.subarray(0, inFile));
      return block;
    });
  }

  /** The lowest cluster findFree may hand out: 0 only under the overlap guard (see AllocatorHooks.vet). */
  private firstCandidate(): number {
    return this.hooks.vet ? this.freeHint : Math.max(this.freeHint, 1);
  }

  /**
   * Refuse clusters [start, +n) when the overlap guard does: with its message, as a corruption the
   * writer marks the image for; with its error (a check that cannot be made), as that error.
   */
  private vet(start: number, n: number, what?: AllocPurpose): void {
    const refused = this.hooks.vet?.(start * this.clusterSize, n * this.clusterSize, what);
    if (refused instanceof QcowError) throw refused;
    if (refused !== undefined) throw new CorruptionEvent(refused);
  }

  setOverlapGuard(vet: NonNullable<AllocatorHooks['vet']>): void {
    this.hooks.vet = vet;
  }

  /** Whether `cluster` holds a refcount block named by the table (the overlap guard's question). */
  isRefcountBlock(cluster: number): boolean {
    return this.refcountBlockClusters().has(cluster);
  }

  /** One past the highest cluster a refcount block has held since the set was built (an upper bound). */
  refcountBlocksEnd(): number {
    this.refcountBlockClusters();
    return this.blockClustersEnd;
  }

  private refcountBlockClusters(): Set<number> {
    let set = this.blockClusters;
    if (!set) {
      set = new Set();
      // The table is mostly zeros (8192 entries for a 64 KiB cluster image of any size): the set
      // entries are found by firstNonZero's word scan over the table's bytes. A JavaScript loop
      // over every entry was the one function V8 optimised in a convert to qcow2, on the main
      // thread (~11M instructions, ~270 page faults of a 64 KiB convert's fixed cost), and Set's
      // constructor over the typed array iterates it entry by entry (~110 page faults).
      let end = 0;
      const bytes = new Uint8Array(this.table.buffer, this.table.byteOffset, this.table.byteLength);
      for (let at = firstNonZero(bytes, 0, bytes.length); at < bytes.length; at = firstNonZero(bytes, at, bytes.length)) {
        const off = this.table[at >>> 3]!;
        at = ((at >>> 3) + 1) * 8;
        const c = Math.floor(off / this.clusterSize);
        set.add(c);
        if (c >= end) end = c + 1;
      }
      this.blockClusters = set;
      this.blockClustersEnd = end;
    }
    return set;
  }

  /** Clusters of the refcount blocks, built at the first question and kept up to date by ensureBlock. */
  private blockClusters: Set<number> | undefined;
  /** One past the highest cluster blockClusters has held (blocks dropped leave it where it was). */
  private blockClustersEnd = 0;

  /** The end of a reserved range holding cluster `c` (every cluster up to it is reserved); -1 when none holds it. */
  private reservedEnd(c: number): number {
    for (const [s, e] of this.reserved) if (c >= s && c < e) return e;
    return -1;
  }

  private isReserved(c: number): boolean {
    for (const [s, e] of this.reserved) if (c >= s && c < e) return true;
    return false;
  }

  private async isFree(c: number): Promise<boolean> {
    if ((c === 0 && !this.hooks.vet) || this.isReserved(c) || this.hooks.inUse?.(c)) return false;
    return (await this.get(c)) === 0;
  }

  /** The first run of `n` free clusters at or after the hint. Cluster 0 (the header) is never free. */
  private async findFree(n: number): Promise<number> {
    let start = this.firstCandidate();
    let c = start;
    // While every cluster scanned so far has a non-zero refcount, the hint may follow the scan:
    // without this the hint stayed put after the first allocation above it, and each allocation
    // rescanned every cluster allocated before it (quadratic: 8000 appends took 13 s). Reserved
    // and hook-protected clusters stop the advance (they may still turn out free).
    let advancing = true;
    // The block of the cluster being looked at, loaded once for all its clusters (read only).
    let blockIndex = -1;
    let block: Uint8Array | undefined;
    while (c < start + n) {
      // A reserved range is passed over whole, as the loop below would pass it cluster by
      // cluster: an allocation's own range stays reserved while its refcount blocks are made, and
      // each new block's search walked it (512 clusters per 2 MiB with 4 KiB clusters).
      const passed = this.reservedEnd(c);
      if (passed !== -1) {
        advancing = false;
        start = c = passed;
        continue;
      }
      const b = Math.floor(c / this.perBlock);
      const plain = !this.hooks.inUse?.(c);
      if (plain && (b >= this.table.length || this.table[b] === 0)) {
        advancing = false;
        c++;
        continue;
      }
      if (plain && b !== blockIndex) {
        block = await this.loadBlock(b);
        blockIndex = b;
      }
      // Clusters of this block that are all free and all plain (nothing reserved or in use): one
      // scan for the lot, as the loop would find them one by one (a claim past the end of a
      // growing image scans hundreds with 4 KiB clusters).
      if (plain && this.reserved.length === 0 && this.hooks.inUse === undefined) {
        const to = Math.min(start + n, (b + 1) * this.perBlock);
        if (to - c > 1 && refcountsZero(block!, c % this.perBlock, to - c, this.refcountBits)) {
          advancing = false;
          c = to;
          continue;
        }
      }
      if (plain && getRefcount(block!, c % this.perBlock, this.refcountBits) !== 0) {
        if (advancing) this.freeHint = c + 1;
        start = c = c + 1;
      } else if (plain) {
        advancing = false;
        c++;
      } else {
        advancing = false;
        start = c = c + 1;
      }
    }
    if (!Number.isSafeInteger((start + n) * this.clusterSize)) throw new QcowError('QCOW_UNSUPPORTED', 'image file would grow beyond 2^53 bytes');
    return start;
  }

  /** Run `fn` with [start, start+n) kept from being handed out (findFree skips it). */
  private async withReserved<T>(start: number, n: number, fn: () => Promise<T>): Promise<T> {
    this.reserved.push([start, start + n]);
    try {
      return await fn();
    } finally {
      this.reserved.splice(this.reserved.findIndex(([s]) => s === start), 1);
    }
  }

  /** The refcount blocks that describe [start, start+n), made where missing. */
  private async ensureBlocks(start: number, n: number): Promise<void> {
    for (let b = Math.floor(start / this.perBlock); b <= Math.floor((start + n - 1) / this.perBlock); b++) await this.ensureBlock(b);
  }

  /** Give [start, start+n) refcount 1, creating refcount blocks (and table room) as needed. */
  private async claim(start: number, n: number): Promise<void> {
    await this.withReserved(start, n, () => this.ensureBlocks(start, n));
    await this.update(start * this.clusterSize, n * this.clusterSize, 1);
    if (start <= Math.max(this.freeHint, 1)) this.freeHint = start + n;
  }

  /**
   * The block for table entry `b`, made if missing. A new block lives in the first free cluster;
   * if that cluster is one the block describes, the block counts itself.
   */
  private async ensureBlock(b: number): Promise<Uint8Array> {
    if (b < this.table.length && this.table[b] !== 0) return this.loadBlock(b);
    if (b >= this.table.length) {
      await this.growTable(b);
      // Growing may itself have made block b (for the new table's own clusters).
      if (this.table[b] !== 0) return this.loadBlock(b);
    }
    const loc = await this.findFree(1);
    this.vet(loc, 1, 'refcount block');
    const lb = Math.floor(loc / this.perBlock);
    const block = new Uint8Array(this.clusterSize);
    if (lb === b) {
      setRefcount(block, loc % this.perBlock, this.refcountBits, 1);
    } else {
      this.reserved.push([loc, loc + 1]);
      try {
        const other = await this.ensureBlock(lb);
        setRefcount(other, loc % this.perBlock, this.refcountBits, getRefcount(other, loc % this.perBlock, this.refcountBits) + 1);
        this.dirtyBlocks.add(lb);
      } finally {
        this.reserved.splice(this.reserved.findIndex(([s]) => s === loc), 1);
      }
    }
    this.noteUsed(loc, 1);
    if (loc === this.freeHint) this.freeHint = loc + 1;
    this.table[b] = loc * this.clusterSize;
    if (this.blockClusters) {
      this.blockClusters.add(loc);
      if (loc >= this.blockClustersEnd) this.blockClustersEnd = loc + 1;
    }
    // Dirty before it is cached, so the insertion's trim cannot drop it.
    this.dirtyBlocks.add(b);
    this.blocks.set(b, block);
    this.newBlocks.add(b);
    this.dirtyTableEntries.add(b);
    return block;
  }

  /**
   * Move the table to the end of the file with room for entry `b` and for the blocks that will
   * describe the new table itself. The new table is written by writeBack.
   */
  private async growTable(b: number): Promise<void> {
    this.store.debugEvent?.('reftable_grow');
    const cs = this.clusterSize;
    const perCluster = cs / 8;
    const at = Math.max(this.endCluster, this.freeHint, 1, ...this.reserved.map(([, e]) => e));
    let clusters = Math.max(Math.ceil((b + 1) / perCluster), Math.ceil(this.tableClusters * 1.5), this.tableClusters + 1);
    // The new table's own clusters, plus a couple of new blocks after them, must be describable.
    while (Math.floor((at + clusters + 2) / this.perBlock) >= clusters * perCluster) clusters++;
    if (clusters * cs > MAX_REFTABLE_BYTES) throw new QcowError('QCOW_UNSUPPORTED', 'refcount table would exceed 8 MiB: the image is too large for its cluster size');
    const old = this.movedFrom ?? { offset: this.tableOffset, clusters: this.tableClusters };
    const grown = new Float64Array(clusters * perCluster);
    grown.set(this.table);
    this.table = grown;
    // Claim the table's clusters (ensureBlock may place blocks right after them).
    this.reserved.push([at, at + clusters]);
    try {
      for (let bb = Math.floor(at / this.perBlock); bb <= Math.floor((at + clusters - 1) / this.perBlock); bb++) await this.ensureBlock(bb);
    } finally {
      this.reserved.splice(this.reserved.findIndex(([s]) => s === at), 1);
    }
    await this.update(at * cs, clusters * cs, 1);
    if (this.movedFrom) {
      // A table that moved twice before one write-back was never on disk: just drop its clusters.
      await this.update(this.tableOffset, this.tableClusters * cs, -1);
    }
    this.movedFrom = old;
    this.tableOffset = at * cs;
    this.tableClusters = clusters;
  }

  private noteUsed(c: number, n: number): void {
    if (c + n > this.endCluster) this.endCluster = c + n;
  }

  private noteFreed(c: number): void {
    if (this.collectFreed) {
      const last = this.freedRuns[this.freedRuns.length - 1];
      const offset = c * this.clusterSize;
      if (last && last[0] + last[1] === offset) last[1] += this.clusterSize;
      else this.freedRuns.push([offset, this.clusterSize]);
    }
    if (c < this.freeHint) this.freeHint = c;
    if (this.freeByteOffset !== 0 && Math.floor(this.freeByteOffset / this.clusterSize) === c) this.freeByteOffset = 0;
  }
}
