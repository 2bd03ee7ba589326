/**
 * The write path of a QCOW2 device: cluster allocation, copy-on-write, zero clusters, discard,
 * compressed clusters, and write-back of metadata in a crash-safe order.
 *
 * Ordering argument (what a kill -9 or a power cut at any instant can leave behind):
 *   - Guest data is written to its host clusters before any L2 entry that points at them is
 *     changed, so an on-disk L2 entry never points at clusters whose data was never written.
 *     (Without a flush, a power cut may still lose the data itself, which is allowed: the guest
 *     did not flush. Process kills never reorder writes that completed.)
 *   - Refcount increments (Refcounts) are written, then a barrier, then L2 tables, a barrier,
 *     then L1 entries, a barrier. Every on-disk reference therefore has its refcount on disk.
 *     An L2 table evicted from the cache between flushes goes through the same gate
 *     (`beforeL2Write`), always with the lock held: a guest write changing the table or the
 *     refcounts while that gate ran (writeNow needs no lock turn) would otherwise get its entries
 *     written after the gate, ahead of their refcounts (metadata-cache.ts). Readers evict only
 *     clean tables, and leave dirty ones to a trim they ask the lock for.
 *   - Decrements wait in Refcounts until all tables are written (applyPendingFrees), so a count
 *     on disk is never below the references on disk, and a freed cluster cannot be reused while
 *     an on-disk table might still point at it.
 *   - A kill therefore leaves at most leaked clusters. With lazy_refcounts the dirty bit is set
 *     (and flushed) before the first change, refcount barriers are skipped, and the bit is
 *     cleared on clean close; a dirty image is repaired when it is next opened for writing.
 * Only `flush()` issues fsyncs (plus the rare cache eviction); writes themselves do not.
 */
import type { BlockExtent, PlacedRange, ZeroOptions } from '../../core/block-device.js';
import { CorruptionEvent, ImageMarkedCorrupt, QcowError, UnwrittenMetadata, altHex, unsupported } from '../../core/errors.js';
import { overlapMessage } from './overlap.js';
import { Mutex } from '../../core/mutex.js';
import { firstNonZero } from '../../core/bytes.js';
import { COMPRESSION_ZSTD, type Qcow2Header } from './header.js';
import { MAX_L1_ENTRIES } from './layout.js';
import { readHeader } from './read-header.js';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, AUTOCLEAR_BITMAPS, AUTOCLEAR_KNOWN, hasFeature } from './features.js';
import { PersistentBitmaps, type BitmapLimits, type BitmapWriteHost } from './bitmaps/persistent.js';
import {
  ALL_SUBCLUSTERS,
  decodeL2Entry,
  isCopiedNormalEntry,
  l2EntryBitmap,
  l2EntryCopied,
  l2EntryInvalid,
  readL2Entry,
  setCopiedNormalEntry,
  setL2Bitmap,
  standardL2Entry,
  subclusterRange,
  type ClusterDescriptor,
} from './l2-entry.js';
import { encodeCompressedDescriptor } from './compressed-descriptor.js';
import { l1EntryCopied, l1TableOffset } from './l1-entry.js';
import type { CachedTable } from './metadata-cache.js';
import { Refcounts, type Allocator } from './alloc.js';
import { DEFAULT_DISCARD_PASSTHROUGH, passesDiscard, type DiscardPassthrough, type FreeReason } from './free-reason.js';
import type { ClusterMap } from './cluster-map.js';
import type { DataIo } from './data-io.js';
import type { Qcow2Image } from './image.js';
import { BytesPayload, PlacedPayload, type Payload } from './payload.js';
import { EmptyingFailed, canEmptyCompletely, finishEmptying, rebuildEmpty } from './make-empty.js';

/** What the writer works on: the image's state, its cluster map and its data I/O. */
export interface WriterParts {
  image: Qcow2Image;
  map: ClusterMap;
  io: DataIo;
  /** A backing image shows through unallocated clusters (one is open, or the header names one). */
  hasBacking(): boolean;
  /** This layer's allocation of a range (the device's blockStatus). */
  layerStatus(offset: number, length: number): Promise<BlockExtent[]>;
  /** Whether a range reads as zeros through the whole chain, by allocation alone (qemu's is_zero). */
  chainReadsZero(offset: number, length: number): Promise<boolean>;
  bitmapLimits: BitmapLimits;
  /** The allocator to use; by default the image's refcounts are loaded (tests give a fake). */
  allocator?: Allocator;
  /** Lazy refcounts for this open, whatever the header says (OpenOptions.lazyRefcounts). */
  lazyRefcounts?: boolean;
  /** The open's pass-discard-* options (OpenOptions.discardPassthrough; QEMU's defaults otherwise). */
  discardPassthrough?: Partial<DiscardPassthrough>;
  /** Told the messages of the repair of a dirty image at open (OpenOptions.onRepair). */
  onRepair?: (messages: readonly string[]) => void;
  /** Told what QEMU prints about a step that failed while the request went on (OpenOptions.onWarning). */
  onWarning?: (message: string) => void;
}

/** A guest write waiting for the lock (see Qcow2Writer.enqueueWrite). */
interface QueuedWrite {
  offset: number;
  data: Uint8Array;
  resolve(done: Promise<void> | undefined): void;
  reject(e: unknown): void;
}

/** A run of writeInTable whose data write finishes outside the lock, and how it ended so far. */
interface LateRun {
  state: 'running' | 'written' | 'failed';
}

/** One cluster's share of a write: where its bytes go and what its entry becomes. */
interface Piece {
  index: number;
  clusterGuest: number;
  /** The bytes to write, in guest offsets: the request clipped to the cluster, widened for COW. */
  ws: number;
  we: number;
  alloc: boolean;
  /** Host offset of the cluster (filled in for allocations). */
  host: number;
  old: ClusterDescriptor;
  /** Extended L2: subclusters that become allocated. */
  subMask: bigint;
  /** The entry's bytes before the write, kept for a run whose data write finishes after linking. */
  oldRaw?: Uint8Array;
}

/**
 * A lazy-refcounts image left dirty (not closed cleanly): its refcounts cannot be trusted, so they
 * are recounted from the tables and written before anything is allocated (qemu does the same).
 */
async function repairDirty(image: Qcow2Image, map: ClusterMap, onRepair: WriterParts['onRepair']): Promise<void> {
  // Loaded only here: the checker is not needed by ordinary writes.
  const { checkQcow2 } = await import('./check.js');
  const result = await checkQcow2(image.store, { repair: 'all' });
  onRepair?.(result.messages);
  // A repair that could not finish (it marked the image corrupt) fails the open, as in QEMU.
  if (result.failed !== undefined) throw new QcowError('QCOW_CORRUPT', `could not repair the dirty image: ${result.failed}`, { errno: 'EIO', file: image.store.name });
  // The repair wrote the header (a moved refcount table) and maybe the L1 table: take them again.
  const { header: fresh } = await readHeader(image.store);
  image.noteHeaderWritten((h) => {
    h.refcountTableOffset = fresh.refcountTableOffset;
    h.refcountTableClusters = fresh.refcountTableClusters;
  });
  await map.reloadL1();
  map.l2Cache.clear();
  await image.writeHeader((h) => {
    h.incompatibleFeatures &= ~INCOMPAT_DIRTY;
  });
  await image.store.flush();
  image.setFileSize(await image.store.size());
}

/** Guest clusters [first, end) whose allocating data write is in flight; `settled` never rejects. */
interface AllocatingRun {
  first: number;
  end: number;
  settled: Promise<void>;
}

export class Qcow2Writer {
  private readonly lock = new Mutex();
  /** Compressed writes enter `lock` in the order they were called (see writeCompressed). */
  private readonly compressOrder = new Mutex();
  private l2Written = false;
  /**
   * Runs of guest clusters [first, end) whose allocation is in flight, entries set (see
   * noteAllocating, dependency). A list of runs, not a map per cluster: a convert has a few runs of
   * 32 clusters in flight, and a map entry set and deleted per cluster was a per-cluster cost.
   */
  private readonly allocating: AllocatingRun[] = [];
  /** In-place data writes started under the lock and still running (see write()). */
  private inFlight = 0;
  /** Resolved when inFlight next drops to zero (made only when someone waits). */
  private drained: { promise: Promise<void>; resolve: () => void } | undefined;
  /** Called when a tracked write settles (one function for all of them, see track). */
  private readonly untrack = (): void => {
    if (--this.inFlight === 0 && this.drained) {
      const d = this.drained;
      this.drained = undefined;
      d.resolve();
    }
  };
  /** A descriptor reused by loops that decode an entry per cluster and keep none of them. */
  private readonly scratchEntry = readL2Entry(new Uint8Array(16), 0, { clusterBits: 9, extendedL2: false, externalDataFile: false });
  /** A lower bound of the image file's length (see writeRun). */
  private knownFileEnd = 0;
  private dirtyBitSet = false;
  /**
   * A discard or an unmapping zero write dropped references that have not taken effect yet. The
   * next write settles them first (settleFrees), so it can reuse those clusters as QEMU does
   * instead of growing the file.
   */
  private unmapFreesPending = false;
  private readonly cs: number;
  /** The image's persistent dirty bitmaps: enabled ones record every write while we hold it. */
  bitmaps!: PersistentBitmaps;

  private readonly image: Qcow2Image;
  private readonly map: ClusterMap;
  private readonly io: DataIo;

  private constructor(private readonly parts: WriterParts) {
    this.image = parts.image;
    this.map = parts.map;
    this.io = parts.io;
    this.cs = parts.image.clusterSize;
  }

  /** The allocator (the cluster map holds it; amend may replace it). */
  get refcounts(): Allocator {
    return this.map.refcounts;
  }

  static async attach(parts: WriterParts): Promise<Qcow2Writer> {
    const { image, map } = parts;
    const h = image.header;
    if (parts.lazyRefcounts && h.version < 3) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level', { file: image.store.name });
    if (hasFeature(h.incompatibleFeatures, INCOMPAT_DIRTY)) await repairDirty(image, map, parts.onRepair);
    const rc = parts.allocator ?? await Refcounts.load(image.store, {
      clusterSize: image.clusterSize,
      refcountBits: 2 ** h.refcountOrder,
      tableOffset: h.refcountTableOffset,
      tableClusters: h.refcountTableClusters,
      // As qemu sizes its refcount cache: a quarter of the L2 cache.
      cacheBytes: map.cacheBytes / 4,
    });
    rc.setDiscardPassthrough?.({ ...DEFAULT_DISCARD_PASSTHROUGH, ...parts.discardPassthrough });
    const w = new Qcow2Writer(parts);
    // The metadata cache's write-back dependency: refcounts (and the data) before L2 tables; and
    // the trims readers ask for, run under the lock as every write-back is (metadata-cache.ts).
    // A failed one is not lost: the table stays dirty and the next flush reports the error.
    map.attachRefcounts(
      rc,
      () => w.beforeL2Write(),
      (job) => void w.locked(job).catch(() => undefined),
    );
    map.afterTableAlloc = () => w.tableAllocated();
    // Reads wait for the allocations in flight of the clusters they map (DataIo.allocationInFlight).
    parts.io.allocationInFlight = (offset, length) => w.dependency(offset, length);
    const bitmapsValid = hasFeature(h.autoclearFeatures, AUTOCLEAR_BITMAPS);
    if (h.bitmaps && !bitmapsValid) {
      // A program without bitmap support wrote the image (it cleared the autoclear bit): the
      // bitmaps are stale. As QEMU does, drop the extension; their clusters leak until a repair.
      await image.writeHeader((hh) => {
        hh.bitmaps = undefined;
      });
      await image.store.flush();
    }
    w.bitmaps = await PersistentBitmaps.load(w.bitmapHost(), h.bitmaps, bitmapsValid, parts.bitmapLimits);
    // Enabled bitmaps are flagged in_use on disk before the first write (see persistent.ts).
    await w.bitmaps.startTracking();
    // qemu clears autoclear bits it does not know the first time it opens an image read-write.
    if ((h.autoclearFeatures & ~AUTOCLEAR_KNOWN) !== 0n) {
      await image.writeHeader((hh) => {
        hh.autoclearFeatures &= AUTOCLEAR_KNOWN;
      });
      await image.store.flush();
    }
    return w;
  }

  /** What the bitmaps may use of the image: allocation, deferred frees, refcounts, the header. */
  private bitmapHost(): BitmapWriteHost {
    const image = this.image;
    return {
      store: image.store,
      clusterSize: this.cs,
      canStore: image.header.version === 3,
      get size() {
        return image.size;
      },
      fileSize: () => image.fileSize,
      alloc: async (n) => {
        const at = await this.refcounts.allocClusters(n);
        this.map.noteGrowth();
        return at;
      },
      // Bitmap tables and data are passed down as discards whatever the options say.
      free: (offset, length) => this.refcounts.free(offset, length, 'always'),
      exclusive: (fn) => this.locked(fn),
      commit: async () => {
        await this.writeRefcounts();
        await image.store.flush();
      },
      setExtension: async (ext) => {
        await image.writeHeader((h) => {
          h.bitmaps = ext;
          if (ext) h.autoclearFeatures |= AUTOCLEAR_BITMAPS;
          else h.autoclearFeatures &= ~AUTOCLEAR_BITMAPS;
        });
        await image.store.flush();
      },
    };
  }

  /** Run a bitmap edit (qcow bitmap) with the metadata written back and the lock held. */
  editBitmaps<T>(fn: (bitmaps: PersistentBitmaps) => Promise<T>): Promise<T> {
    return this.exclusive(() => fn(this.bitmaps));
  }

  get lazyRefcounts(): boolean {
    return this.parts.lazyRefcounts ?? hasFeature(this.image.header.compatibleFeatures, COMPAT_LAZY_REFCOUNTS);
  }

  /**
   * Lazy refcounts in use (the dirty bit is on disk): refcount changes stay in memory and reach
   * the disk at close, not at flushes or before L2 tables, as in QEMU, which drops the L2 cache's
   * dependency on the refcount cache and skips the refcounts when it flushes a dirty image. A
   * crash leaves counts a repair recounts (at the next writable open).
   */
  private get refcountsDeferred(): boolean {
    return this.dirtyBitSet && this.lazyRefcounts;
  }

  /**
   * A new L2 table was allocated (ClusterMap.afterTableAlloc): with refcounts deferred, the counts
   * so far go to disk now, as QEMU writes its refcount cache back when it allocates an L2 table.
   * A crash then leaves at most data clusters uncounted, which is what a repair of a QEMU image
   * reports too.
   */
  async tableAllocated(): Promise<void> {
    if (this.refcountsDeferred) await this.writeRefcounts();
  }

  private get external(): boolean {
    return this.image.external;
  }

  private barrier = (): Promise<void> => this.image.store.flush();

  // --- public operations (each runs under the writer's lock) ------------------------------------

  write(offset: number, data: Uint8Array): Promise<void> {
    if (this.allocating.length > 0) {
      const dep = this.dependency(offset, data.length);
      if (dep) return dep.then(() => this.write(offset, data));
    }
    // The common request, an overwrite in place or fresh clusters filling a cached table, needs
    // no I/O before its data write starts. When no one else wants the lock (no write waiting, no
    // batch of them in the middle of its changes, no other holder or waiter) it is done here in
    // one synchronous step, the same as taking the lock and releasing it at once, and the caller
    // gets the data write's own promise: no async frame, lock turn or suspension per request.
    if (this.waiting.length === 0 && !this.serving && this.lock.mayOvertake && this.brokenBy === undefined) {
      const started = this.writeNow(offset, data);
      if (started !== undefined) return started;
    }
    return this.enqueueWrite(offset, data);
  }

  /**
   * Queue a write for the batch now waiting for the lock (serveWrites), or start one. Writes that
   * come while a batch waits join it and are served in their order, most of them in the batch's
   * one synchronous sweep: one lock turn per request kept the lock busy for the whole of a queue
   * depth 32 run (each new request found the ones before it still waiting, so it waited too).
   */
  private enqueueWrite(offset: number, data: Uint8Array): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const batch = this.waiting;
      batch.push({ offset, data, resolve, reject });
      if (batch.length === 1) void this.lock.run(() => this.serveWrites(batch), true);
    });
  }

  /**
   * Serve a batch of queued writes in order, under the lock: each by writeNow when it can be,
   * else by the general path (writeLockedStep), whose suspensions let later writes join the batch.
   * Each request's promise is its data writes' (they finish outside the lock). The lock run may be
   * overtaken (Mutex) only once the sweep is over (`serving`), when nothing of the batch is left.
   */
  private async serveWrites(batch: QueuedWrite[]): Promise<void> {
    this.serving = true;
    try {
      for (let i = 0; i < batch.length; i++) {
        const w = batch[i]!;
        const broken = this.brokenBy;
        if (broken) {
          w.reject(new ImageMarkedCorrupt(broken, this.image.store.name));
          continue;
        }
        try {
          if (this.map.overlap?.inactiveL2Stale) await this.map.overlap.loadInactiveL2();
          // A cluster of it is being allocated by an earlier write of the batch (or before it):
          // it starts over once that allocation is done, outside this batch.
          const dep = this.dependency(w.offset, w.data.length);
          if (dep) {
            w.resolve(dep.then(() => this.write(w.offset, w.data)));
            continue;
          }
          const started = this.writeNow(w.offset, w.data);
          if (started !== undefined) w.resolve(started);
          else {
            const jobs = await this.writeLockedStep(w.offset, w.data);
            // One write (the usual request) is handed on as it is, without a Promise.all around it.
            w.resolve(jobs.length <= 1 ? jobs[0] : Promise.all(jobs).then(() => undefined));
          }
        } catch (e) {
          // As guarded(): a corruption marks the image corrupt, and the later writes then fail.
          if (e instanceof CorruptionEvent) await this.markCorrupt(e).catch(() => undefined);
          w.reject(e);
        }
      }
    } finally {
      // Emptied in place: while it is still `waiting`, the next write then starts a new batch.
      batch.length = 0;
      this.serving = false;
    }
  }

  /**
   * write() without suspending, when it can be: the data write started (and tracked, see track)
   * with the entries and refcounts changed in memory; undefined, with nothing done, when the
   * request needs the general path (writeQueued). Only steps that cannot suspend: a cached table,
   * bitmaps recorded without I/O, clusters from allocClustersNow, the table marked dirty in place.
   */
  private writeNow(offset: number, data: Uint8Array): Promise<void> | undefined {
    const table = this.cachedTableFor(offset, data.length);
    if (table === null) return undefined;
    // What writeQueued decides under the lock, decided first, so nothing is changed when the
    // request goes there after all. Only the bitmap range may be recorded by both: the same range
    // twice is the same record.
    const fresh = !this.unmapFreesPending && (this.dirtyBitSet || !this.lazyRefcounts) && this.freshRun(table, offset, data.length);
    const host = fresh ? -1 : this.inPlaceHost(table, offset, data.length);
    if (!fresh && host < 0) return undefined;
    // A write onto metadata is left to the general path, which refuses it (this one must not throw).
    if (!fresh && this.overlapsMetadata(host, data.length) !== undefined) return undefined;
    if (!this.bitmaps.markNow(offset, data.length)) return undefined;
    // A blkdebug breakpoint may hold the data write (QEMU suspends the request at the event).
    const held = this.image.store.debugEvent?.('write_aio');
    if (!fresh) return this.track(held ? held.then(() => this.image.dataStore.write(host, data)) : this.image.dataStore.write(host, data));
    const written = this.freshBytesNow(table, offset, data, held);
    // The table is the cached one (cachedTableFor): marking it changed neither suspends nor evicts.
    if (written !== undefined) void this.map.tableChanged(table);
    return written;
  }

  /**
   * The cached L2 slice of a request that lies in one slice of a COPIED table of an image whose
   * clusters are plain bytes at their host offset (no encryption, no subclusters); null otherwise,
   * and when the slice is not cached (no load is started).
   */
  private cachedTableFor(offset: number, length: number): CachedTable | null {
    const l2 = this.ownedTableOffset(offset, length);
    return l2 > 0 ? (this.map.l2Cache.peek(l2) ?? null) : null;
  }

  /**
   * The host offset of the L2 slice that alone covers [offset, +length), in a COPIED table (see
   * inPlaceTable); 0 when there is none.
   */
  private ownedTableOffset(offset: number, length: number): number {
    const { image, map } = this;
    const g = image.geometry;
    if (image.encryption || g.extendedL2 || length === 0) return 0;
    const sc = map.slice.coverage;
    if (Math.floor(offset / sc) !== Math.floor((offset + length - 1) / sc)) return 0;
    const i = Math.floor(offset / g.l2Coverage);
    if (i >= map.l1Entries || !l1EntryCopied(map.l1, i)) return 0;
    const l2 = l1TableOffset(map.l1, i);
    return l2 > 0 ? map.sliceAt(l2, offset) : 0;
  }

  /**
   * Where [offset, +length) lies in the file when all its clusters are COPIED normal clusters
   * following one another there (one store write then does the request, see inPlaceWrites); -1
   * otherwise, or for an entry that does not decode (the general path reports it, under the lock).
   */
  private inPlaceHost(table: CachedTable, offset: number, length: number): number {
    const sc = this.map.slice.coverage;
    const cs = this.cs;
    const end = offset + length;
    const d = this.scratchEntry; // looked at within each step only
    let host = -1;
    try {
      for (let c = offset - (offset % cs); c < end; c += cs) {
        decodeL2Entry(table.data, (c % sc) / cs, this.image.l2Context, d);
        if (d.kind !== 'normal' || !l2EntryCopied(d)) return -1;
        if (host === -1) host = d.hostOffset + (offset - c);
        else if (d.hostOffset !== host + (c - offset)) return -1;
      }
    } catch {
      return -1;
    }
    return host;
  }

  /**
   * freshNow for a request's own bytes (no payload object, no list of jobs): the clusters
   * allocated, their data write started and tracked, their entries set; undefined, with nothing
   * done, when the allocator cannot hand them out at once. The caller marks the table changed.
   */
  private freshBytesNow(table: CachedTable, start: number, data: Uint8Array, held: Promise<void> | void): Promise<void> | undefined {
    const cs = this.cs;
    const n = data.length / cs;
    const rc = this.refcounts;
    const host = rc.allocClustersNow ? rc.allocClustersNow(n) : -1;
    if (host === -1) return undefined;
    this.map.noteGrowth();
    const first = (start % this.map.slice.coverage) / cs;
    const ds = this.image.dataStore;
    const written = this.trackFresh(held ? held.then(() => ds.write(host, data)) : ds.write(host, data), table, first, n, host, start);
    // A lower bound of the file's length once the write lands, noted now (writeFreshData notes it
    // after): it only spares writeRun a size check for clusters below it, and every cluster below
    // it is written whole by a write already started. Should that write fail, its request fails
    // and abortFresh lowers the bound again.
    this.knownFileEnd = Math.max(this.knownFileEnd, host + data.length);
    setCopiedNormalRun(table.data, first, n, host, cs);
    this.io.forgetCompressed();
    return written;
  }

  /**
   * The general path of write(), the lock held: metadata changed, data writes started; those data
   * writes are handed back (in a list: an async function would adopt a promise it returns) so the
   * lock is not held while they run.
   */
  private async writeLockedStep(offset: number, data: Uint8Array): Promise<Promise<void>[]> {
    // Overwrites of clusters we own change no metadata: decide under the lock, then write the
    // data outside it so requests at queue depth > 1 overlap their I/O (the lock otherwise
    // serialises every write). See inPlaceWrites for why this stays safe.
    const marking = this.bitmaps.mark(offset, data.length);
    if (marking) await marking;
    // An overwrite in place allocates nothing, so it has no use for freed clusters: settling the
    // frees (a metadata write-back with its barriers) waits for the first write that allocates.
    // A convert -n that alternates data and zeros over an allocated image otherwise paid one
    // write-back per data run. The clusters it writes are referenced (COPIED entries), so none
    // of them is among the pending frees.
    const found = this.inPlaceTable(offset, data.length);
    const table = found instanceof Promise ? await found : found;
    let jobs = this.inPlaceWrites(table, offset, data);
    if (!jobs && table && !this.unmapFreesPending && (this.dirtyBitSet || !this.lazyRefcounts) && this.freshRun(table, offset, data.length)) {
      // New clusters in a cached table (guest writes filling an image): allocated, started and
      // linked here at once, as writeLocked -> writeInTable -> writeFresh would, without their
      // four suspensions (each an async frame of garbage, at every 64 KiB request).
      const started: Promise<void>[] = [];
      if (this.freshNow(table, offset, new BytesPayload(data), started)) {
        jobs = started;
        const changing = this.map.tableChanged(table);
        if (changing) await changing;
      }
    }
    if (!jobs) {
      if (this.unmapFreesPending) await this.settleFrees();
      jobs = [];
      await this.writeLocked(offset, data, jobs);
    }
    return jobs;
  }

  /**
   * Copy offload's target side (BlockDevice.writePlaced): clusters are picked and linked as for
   * write(), and `put` copies the bytes into them, outside the lock like other plain data writes;
   * the L2 entries reach the disk only after it finishes (beforeL2Write waits for it). Whole
   * clusters only (the last one may end with the image), and never for encrypted images.
   */
  async writePlaced(offset: number, length: number, put: (range: PlacedRange) => Promise<void>): Promise<void> {
    const cs = this.cs;
    if (this.image.encryption) throw new QcowError('QCOW_UNSUPPORTED', 'copy offload cannot write encrypted clusters', { file: this.image.store.name });
    if (offset % cs !== 0 || (length % cs !== 0 && offset + length !== this.image.size)) {
      throw new QcowError('QCOW_UNSUPPORTED', 'copy offload writes whole clusters only', { file: this.image.store.name });
    }
    let placing: Promise<void> | undefined;
    await this.guarded(async () => {
      await this.settleDependencies(offset, length);
      if (this.unmapFreesPending) await this.settleFrees();
      const marking = this.bitmaps.mark(offset, length);
      if (marking) await marking;
      const jobs: Promise<void>[] = [];
      await this.writeLocked(offset, new PlacedPayload(offset, length, put), jobs);
      if (jobs.length > 0) placing = Promise.all(jobs).then(() => undefined);
    });
    if (placing) await placing;
  }

  /** Guest writes waiting for the lock, in order: the batch the next serveWrites serves. */
  private waiting: QueuedWrite[] = [];
  /** A batch of writes is being served (serveWrites) and may be in the middle of its changes. */
  private serving = false;

  /**
   * Take the lock for anything but a plain guest write (zeroes, discard, flush, snapshots, ...).
   * Writes that come after this call must not be served before it: they start a new batch.
   */
  private locked<T>(fn: () => Promise<T>): Promise<T> {
    if (this.waiting.length > 0) this.waiting = [];
    return this.lock.run(fn);
  }

  /** The corruption that made this image unusable, once one was found (see guarded). */
  private brokenBy: CorruptionEvent | undefined;

  /** The corruption that made this image unusable for the session, if one did (see guarded). */
  get broken(): CorruptionEvent | undefined {
    return this.brokenBy;
  }

  /**
   * Run a guest write under the lock. A corruption it runs into (a CorruptionEvent) marks the image
   * corrupt on disk, as QEMU's qcow2 does, and every later write fails until a repair.
   */
  private guarded<T>(fn: () => Promise<T>): Promise<T> {
    return this.locked(async () => {
      const broken = this.brokenBy;
      if (broken) throw new ImageMarkedCorrupt(broken, this.image.store.name);
      try {
        if (this.map.overlap?.inactiveL2Stale) await this.map.overlap.loadInactiveL2();
        return await fn();
      } catch (e) {
        if (e instanceof CorruptionEvent) await this.markCorrupt(e);
        throw e;
      }
    });
  }

  /**
   * Mark the image corrupt because of `e` (QEMU's qcow2_signal_corruption on a writable image): on
   * disk (version 3), and unusable for the rest of the session. A second event changes nothing.
   */
  async markCorrupt(e: CorruptionEvent): Promise<void> {
    if (this.brokenBy) {
      if (e !== this.brokenBy) this.image.corruption.afterMarked(e);
      return;
    }
    this.brokenBy = e;
    this.image.corruption.marked(e);
    // v2 has no corrupt bit: the image is only refused for the rest of this session.
    if (this.image.header.version < 3) return;
    await this.image.writeHeader((h) => {
      h.incompatibleFeatures |= INCOMPAT_CORRUPT;
    });
    await this.image.store.flush();
    e.markedCorrupt = true;
  }

  /**
   * `n` new clusters for a write, right after the cluster `prev` of the same request that is
   * written in place when they are free there (QEMU's handle_alloc continues the host range
   * handle_copied found), else wherever the allocator finds room.
   */
  private async allocAfter(prev: Piece | undefined, n: number): Promise<number> {
    const rc = this.refcounts;
    if (prev && !prev.alloc && rc.allocClustersAt && (await rc.allocClustersAt(prev.host + this.cs, n))) return prev.host + this.cs;
    return rc.allocClusters(n);
  }

  /**
   * A write meets a cluster its entry places at an unaligned host offset (entry `index` of
   * `table`, written from guest offset `guest`): a corruption event, in QEMU's words. A COPIED
   * cluster would be written in place; any other would be copied from, unless the write covers it
   * (`whole`: it is replaced, and the old cluster, which cannot be freed, leaks as `release` says).
   */
  private refuseUnaligned(table: CachedTable, index: number, old: ClusterDescriptor, guest: number, whole: boolean): void {
    if (l2EntryCopied(old)) {
      const what = old.kind === 'zero-alloc' ? 'Preallocated zero' : 'Data';
      throw new CorruptionEvent(`${what} cluster offset 0x${old.hostOffset.toString(16)} unaligned (guest offset: ${altHex(guest)})`);
    }
    if (!whole) throw this.map.unalignedCluster(table, index, old.hostOffset);
  }

  /** Note a data write running outside the lock; flushes and L2 write-backs wait for it. */
  private track(p: Promise<void>): Promise<void> {
    // A count, not a set of promises: one derived promise per write and no closure (a Set that
    // filled and emptied at every request rebuilt its table: ~0.7 KB of garbage per 64 KiB write).
    this.inFlight++;
    void p.then(this.untrack, this.untrack);
    return p;
  }

  /** Wait for every data write running outside the lock (failed ones count as settled). */
  private async drainInFlight(): Promise<void> {
    while (this.inFlight > 0) {
      if (!this.drained) {
        let resolve!: () => void;
        const promise = new Promise<void>((r) => (resolve = r));
        this.drained = { promise, resolve };
      }
      await this.drained.promise;
    }
  }

  /**
   * The L2 slice an in-place write of [offset, +length) would use: null when the request cannot be
   * one (see inPlaceWrites), the slice when it is cached (no suspension: most requests), else a
   * promise of it.
   */
  private inPlaceTable(offset: number, length: number): CachedTable | Promise<CachedTable | null> | null {
    const l2 = this.ownedTableOffset(offset, length);
    if (l2 === 0) return null;
    return this.map.l2Cache.peek(l2) ?? this.map.l2TableFor(offset, true);
  }

  /**
   * The store writes of a request that lands entirely in clusters this image owns outright
   * (normal, COPIED entries in a COPIED L2 table, no encryption or subclusters), already started;
   * null when the request needs the full path. Started under the lock, finished outside it: the
   * clusters cannot be freed and reused meanwhile because frees only take effect in releaseFrees,
   * whose callers (flushLocked, settleFrees; exclusive(), snapshots and close through flushLocked)
   * first wait for every write in flight.
   */
  private inPlaceWrites(table: CachedTable | null, offset: number, data: Uint8Array): Promise<void>[] | null {
    const { image } = this;
    if (!table) return null;
    const sc = this.map.slice.coverage;
    const cs = this.cs;
    const end = offset + data.length;
    const runs: Array<[number, number, number]> = [];
    const d = this.scratchEntry; // looked at within each step only
    for (let c = offset - (offset % cs); c < end; c += cs) {
      decodeL2Entry(table.data, (c % sc) / cs, image.l2Context, d, true);
      // (An unaligned cluster: the full path signals it.)
      if (d.kind !== 'normal' || !l2EntryCopied(d) || d.hostOffset % cs !== 0) return null;
      const s = Math.max(offset, c);
      const host = d.hostOffset + (s - c);
      const len = Math.min(end, c + cs) - s;
      const last = runs[runs.length - 1];
      if (last && last[0] + last[2] === host) last[2] += len;
      else runs.push([host, s - offset, len]);
    }
    for (const [host, , len] of runs) if (this.overlapsMetadata(host, len) !== undefined) return null;
    const held = image.store.debugEvent?.('write_aio');
    const ds = image.dataStore;
    return runs.map(([host, from, len]) => {
      const bytes = data.subarray(from, from + len);
      return this.track(held ? held.then(() => ds.write(host, bytes)) : ds.write(host, bytes));
    });
  }

  /**
   * QEMU's check before every data write (qcow2_pre_write_overlap_check): the message when guest
   * data at [host, +length) would overwrite metadata, whose L2 entry points there on a corrupt
   * image (new clusters were vetted when allocated); or the error every write fails with (a
   * snapshot L1 table the inactive L2 check refuses, see overlap.ts). No I/O; an external data
   * file holds no metadata.
   */
  private overlapsMetadata(host: number, length: number): string | QcowError | undefined {
    if (this.external) return undefined;
    const found = this.map.overlap?.vet(host, length);
    return found === undefined || found instanceof QcowError ? found : overlapMessage(found);
  }

  writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    return this.guarded(async () => {
      // A partial cluster is written as zero bytes, in place where the cluster looks allocated:
      // one whose allocation is in flight must settle first (see dependency), or the undo of a
      // failed allocation would unlink it under the zeros.
      await this.settleDependencies(offset, length);
      if (this.unmapFreesPending && !options.mayUnmap) await this.settleFrees();
      const marking = this.bitmaps.mark(offset, length);
      if (marking) await marking;
      await this.zeroLocked(offset, length, options, false);
    });
  }

  /** Discards mark bitmaps too, as in QEMU: the range may read differently afterwards. */
  discard(offset: number, length: number): Promise<void> {
    return this.guarded(async () => {
      const marking = this.bitmaps.mark(offset, length);
      if (marking) await marking;
      await this.zeroLocked(offset, length, { mayUnmap: true }, true);
    });
  }

  /** Unlink the cluster holding `offset`, its free not passed on to the file (ClusterMap.unlinkCluster). */
  unlinkCluster(offset: number): Promise<void> {
    return this.guarded(async () => {
      await this.beforeMetadataChange();
      await this.map.unlinkCluster(offset);
    });
  }

  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    // Compress before taking the lock: the lock serialises allocation, and compression done under
    // it would run one cluster at a time while the codec pool could do several at once.
    const zstd = this.image.header.compressionType === COMPRESSION_ZSTD;
    const compressing = this.io.compressClusters(data);
    // Its failure is taken when this call's turn comes; until then it is not unhandled.
    compressing.catch(() => undefined);
    // Compressions run side by side and finish in any order (node:zlib works on libuv's pool), but
    // the clusters are placed in the order the calls came, as qemu-img places them: the same
    // input gives the same file every time. Each call waits for its own compression in turn and
    // queues on the lock then; the wrapper keeps run() from waiting for the locked step itself.
    const queued = await this.compressOrder.run(async () => {
      const results = await compressing;
      return {
        done: this.guarded(async () => {
          // A cluster that does not shrink is written as a normal one (in place, as write() would).
          await this.settleDependencies(offset, data.length);
          if (this.unmapFreesPending) await this.settleFrees();
          const marking = this.bitmaps.mark(offset, data.length);
          if (marking) await marking;
          await this.compressedLocked(offset, data, results, zstd);
        }),
      };
    });
    return queued.done;
  }

  flush(): Promise<void> {
    return this.locked(() => this.flushLocked());
  }

  /** Run `fn` with the metadata written back and the lock held (snapshots, resize, amend). */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.locked(async () => {
      await this.flushWhollyLocked();
      const r = await fn();
      // fn may have shrunk the file (shrink, amend): forget what we knew of its length.
      this.knownFileEnd = 0;
      await this.flushWhollyLocked();
      return r;
    });
  }

  /**
   * flushLocked, and the refcounts too when they are deferred (lazy refcounts): what exclusive
   * operations (snapshots, amend, resize) work on, and leave, is all on disk.
   */
  private async flushWhollyLocked(): Promise<void> {
    await this.flushLocked();
    if (this.refcountsDeferred && (await this.writeRefcounts())) await this.barrier();
  }

  /**
   * Change the virtual size. Growing: a larger L1 table is written elsewhere first, then the
   * header names it, then the old one is freed. Shrinking (only with `shrink`, as qemu-img resize
   * --shrink), in a crash-safe order, the lock held and the metadata flushed on entry:
   *   1. the header gets the new size (flushed): from then on nothing past the end is visible, and
   *      an image with table entries past its size is still a valid image;
   *   2. entries past the end are cleared in the active tables (cluster-map.ts dropPast), their
   *      references dropped through the deferred path, so counts only fall once the tables are on
   *      disk (flushLocked);
   *   3. only then is the file cut, after the last cluster whose refcount is not zero.
   * A kill between any two steps leaves at most leaked clusters.
   */
  resize(size: number, shrink: boolean): Promise<void> {
    return this.exclusive(async () => {
      const { image, map } = this;
      const oldSize = image.size;
      if (size < oldSize && !shrink) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Use the --shrink option to perform a shrink operation.');
      if (image.openedSnapshot) throw unsupported('cannot resize a snapshot');
      // A v2 snapshot entry need not record its disk size: readers take the image's, which a
      // resize would change under it (qemu refuses the same).
      if (image.header.version < 3 && image.header.nbSnapshots > 0) throw unsupported("Can't resize a v2 image which has snapshots");
      this.bitmaps.checkResize();
      if (size < oldSize) {
        await this.dropUnusedRefcountBlocks();
        await image.writeHeader((h) => {
          h.size = size;
        });
        await image.store.flush();
        image.setSize(size);
        await map.dropPast(size, oldSize);
        // Tables, then L1, then the counts drop (flushLocked keeps that order).
        await this.flushLocked();
        await map.trimFile();
        await this.bitmaps.resized(oldSize);
        return;
      }
      const need = Math.ceil(size / image.geometry.l2Coverage);
      await this.growL1Locked(need, (h) => {
        h.size = size;
      });
      image.setSize(size);
      if (size !== oldSize) await this.bitmaps.resized(oldSize);
    });
  }

  /**
   * Where a falloc/full preallocation of the guest range [from, to) that a growth added puts its
   * data, laid out as QEMU's qcow2 truncate does: after the last cluster with a count, a new
   * refcount table (and the blocks it needs) sized for the data clusters and the L2 tables they
   * may need, then the data clusters, one per guest cluster from the one holding `from`, counted
   * at once and handed to the next data allocations in guest order (Allocator.steerData); the old
   * table is freed. The host offset of the first data cluster, or -1 when the allocator cannot.
   */
  preallocationArea(from: number, to: number): Promise<number> {
    return this.exclusive(async () => {
      const cs = this.cs;
      const rc = this.refcounts;
      if (!rc.refcountArea || !rc.steerData || !rc.allocClustersAt) return -1;
      const first = Math.floor(from / cs);
      const n = Math.ceil(to / cs) - first;
      if (n <= 0) return -1;
      // As QEMU, room for the L2 tables the range may need, plus one for an unaligned start.
      const tables = Math.ceil(n / (this.image.geometry.l2Coverage / cs)) + 1;
      let last = Math.ceil((await this.image.store.size()) / cs) - 1;
      while (last >= 0 && (await rc.get(last)) === 0) last--;
      const start = await rc.refcountArea(last + 1, n + tables);
      // The new table and header on disk, the old table freed, before the data is counted.
      await this.flushWhollyLocked();
      if (!(await rc.allocClustersAt(start * cs, n))) throw new Error('the preallocated clusters are not free');
      rc.steerData(start * cs, n);
      return start * cs;
    });
  }

  /**
   * A shrink's first step, QEMU's qcow2_shrink_reftable: refcount blocks that count nothing leave
   * the table. A corrupt table met there marks the image corrupt and fails the shrink before the
   * size changes ("Failed to discard unused refblocks", EIO).
   */
  private async dropUnusedRefcountBlocks(): Promise<void> {
    try {
      await this.refcounts.dropUnusedBlocks?.();
    } catch (e) {
      if (!(e instanceof CorruptionEvent)) throw e;
      await this.markCorrupt(e);
      throw new QcowError('QCOW_CORRUPT', `cannot drop unused refcount blocks: ${e.message}`, { errno: 'EIO', cause: e, file: this.image.store.name });
    }
  }

  /**
   * Give the L1 table at least `need` entries (a larger table written elsewhere, then the header
   * names it with `alsoChange` applied, then the old one is freed); the header is written even
   * when the table is big enough. The lock is held and the metadata flushed.
   */
  private async growL1Locked(need: number, alsoChange?: (h: Qcow2Header) => void): Promise<void> {
    const { image, map } = this;
    const grown = need > map.l1Entries ? await map.growL1(need, this.barrier) : null;
    if (!grown && !alsoChange) return;
    if (grown) image.store.debugEvent?.('l1_grow_activate_table');
    // A header write that failed may still have landed (a real disk's EIO says nothing of that):
    // the new table then stays allocated, a leak at worst, and the active table stays the old one.
    await image.writeHeader((h) => {
      if (grown) {
        h.l1TableOffset = grown.offset;
        h.l1Size = need;
      }
      alsoChange?.(h);
    });
    if (grown) map.replaceL1(grown.l1);
    await image.store.flush();
    if (grown && grown.oldEntries > 0) await this.refcounts.update(grown.oldOffset, grown.oldEntries * 8, -1);
    map.noteGrowth();
  }

  /**
   * Write to the VM state area (Qcow2Device.writeVmState): guest offsets past the disk, which the
   * L1 table grows to reach as QEMU grows it for a savevm (by half its size at least, so a VM state
   * written front to back does not copy the table at every step). The bytes go through the
   * ordinary write path; dirty bitmaps, which cover the disk only, do not see them.
   */
  async writeVmState(offset: number, data: Uint8Array): Promise<void> {
    const g = this.image.geometry;
    const need = Math.ceil((offset + data.length) / g.l2Coverage);
    if (need > MAX_L1_ENTRIES) {
      throw new QcowError('QCOW_OUT_OF_RANGE', `VM state offset 0x${offset.toString(16)} lies beyond what the largest L1 table reaches`, { file: this.image.store.name });
    }
    if (need > this.map.l1Entries) {
      await this.guarded(async () => {
        if (need <= this.map.l1Entries) return;
        await this.flushLocked();
        let entries = Math.max(1, this.map.l1Entries);
        while (entries < need) entries = Math.floor((entries * 3 + 1) / 2);
        await this.growL1Locked(Math.max(need, Math.min(entries, MAX_L1_ENTRIES)));
        await this.flushLocked();
      });
    }
    await this.write(offset, data);
  }

  /** Flush everything, store the bitmaps (clearing in_use) and clear the dirty bit (lazy refcounts). */
  close(): Promise<void> {
    return this.locked(async () => {
      // An image marked corrupt keeps what is on disk: cached metadata a failed request half
      // changed is not written over it (QEMU drops its caches too); a repair recounts.
      if (this.brokenBy || this.ejectedBy) return;
      // Metadata writes refused as a whole (the inactive L2 check, overlap.ts) while a discard or
      // a zero write left tables or counts to write: QEMU's close fails to flush each cache.
      const refusal = await this.metadataRefusal();
      if (refusal) {
        const unwritten: Array<'L2 table' | 'refcount block'> = [];
        if (this.map.l2Cache.hasDirty) unwritten.push('L2 table');
        if (this.refcountsWaiting || this.map.overlap?.refusedAllocation) unwritten.push('refcount block');
        if (unwritten.length > 0) throw new UnwrittenMetadata(unwritten[0]!, refusal, this.image.store.name, unwritten.slice(1));
      }
      await this.flushAtClose();
      await this.bitmaps.store();
      // The old bitmap clusters are freed now that the new directory is on disk.
      await this.flushLocked();
      if (this.dirtyBitSet) {
        // Deferred refcounts (lazy refcounts) are written before the image is called clean.
        if (await this.writeRefcounts()) await this.barrier();
        await this.image.writeHeader((h) => {
          h.incompatibleFeatures &= ~INCOMPAT_DIRTY;
        });
        await this.image.store.flush();
        this.dirtyBitSet = false;
      }
      // An allocation refused by a check that cannot be made (overlap.ts): QEMU changed the
      // refcounts in its cache first, and fails again to write them back now.
      const overlap = this.map.overlap;
      if (overlap?.refusedAllocation) {
        if (overlap.inactiveL2Stale) await overlap.loadInactiveL2();
        if (overlap.refusal) throw new UnwrittenMetadata('refcount block', overlap.refusal, this.image.store.name);
      }
    });
  }

  /**
   * The flush of close, failing as QEMU's close fails when the file does: QEMU flushes its L2
   * table cache (which writes the refcount blocks it depends on first), then its refcount block
   * cache, each ending with a flush of the file, and tells each that failed. The image then stays
   * marked dirty where it was.
   */
  private async flushAtClose(): Promise<void> {
    try {
      await this.flushLocked();
    } catch (e) {
      if (!(e instanceof QcowError && e.code === 'QCOW_IO')) throw e;
      let refcountsToo = false;
      try {
        await this.writeRefcounts();
        await this.image.store.flush();
      } catch (e2) {
        if (!(e2 instanceof QcowError && e2.code === 'QCOW_IO')) throw e2;
        refcountsToo = true;
      }
      throw new UnwrittenMetadata('L2 table', e, this.image.store.name, refcountsToo ? ['refcount block'] : []);
    }
  }

  /**
   * The L2 cache calls this before writing a table back (eviction or flush), with the lock held:
   * nothing changes the tables or the refcounts between this and the table write.
   */
  async beforeL2Write(): Promise<void> {
    // Data before the L2 entries that point at it: fresh clusters may still be being written.
    await this.drainInFlight();
    if (!this.refcountsDeferred && (await this.writeRefcounts())) {
      if (!this.lazyRefcounts) await this.barrier();
    }
    this.l2Written = true;
  }

  // --- metadata write-back -----------------------------------------------------------------------

  async flushLocked(): Promise<void> {
    const { image } = this;
    // Writes in flight first: a flush covers them, and no cluster may be freed under them.
    await this.drainInFlight();
    // Every metadata write refused (overlap.ts): a flush with tables or counts to write fails
    // with the refusal, as QEMU's cache flush does (a zero write's FUA flush, qemu-io's flush).
    if (this.map.l2Cache.hasDirty || this.refcountsWaiting) {
      const refusal = await this.metadataRefusal();
      if (refusal) throw refusal;
    }
    if (this.external) await image.dataStore.flush();
    if ((await this.releaseFrees()) && !this.refcountsDeferred) await this.writeRefcounts();
    await image.store.flush();
  }

  /**
   * Write the tables back in the crash-safe order (refcount increments, barrier, L2 tables,
   * barrier, L1, barrier) and then let the recorded frees take effect: no table on disk names
   * those clusters any more, so their counts may drop, their blocks go back to the file system and
   * allocations may reuse them. True when frees were applied (their refcount blocks are dirty).
   * The caller has drained the writes in flight.
   */
  private async releaseFrees(): Promise<boolean> {
    const { map } = this;
    this.unmapFreesPending = false;
    if (!this.refcountsDeferred && (await this.writeRefcounts())) {
      if (!this.lazyRefcounts) await this.barrier();
    }
    this.l2Written = false;
    await map.l2Cache.flush();
    if (this.l2Written) await this.barrier();
    if (await map.writeL1()) await this.barrier();
    if (!(await this.refcounts.applyPendingFrees())) return false;
    await this.punchFreed();
    return true;
  }

  /**
   * Before a write that follows a discard: make the discarded clusters reusable now rather than at
   * the next flush, so a guest that trims and rewrites (or `qemu-io -c 'discard' -c 'write'`) fills
   * the holes it made instead of growing the file, as in QEMU. QEMU drops the counts at once and
   * orders the refcount and L2 caches against each other; writing the tables first gives the same
   * reuse with a simpler invariant (a count on disk, and a cluster's reuse, never precede the
   * removal of the references to it on disk), at the price of the barriers of a metadata flush once
   * per discard-then-write turn. The count decrements themselves reach disk with later refcount
   * write-backs.
   */
  private async settleFrees(): Promise<void> {
    await this.drainInFlight();
    await this.releaseFrees();
  }

  /**
   * Give the host blocks of clusters nothing references any more back to the filesystem, so the
   * file stops occupying them (as QEMU passes discards down when a cluster's refcount reaches 0).
   * Safe here: no on-disk table points at them, and the lock keeps them from being reused until
   * this returns. A crash after the punch leaves leaked clusters that read as zeros. Images with an
   * external data file are left alone (the freed clusters' bytes may live in either file).
   */
  private async punchFreed(): Promise<void> {
    await this.punchRuns(this.refcounts.freedRuns);
  }

  /**
   * A discard or a zero write just dropped references: punch the clusters they leave with none at
   * once, as QEMU does (with pass-discard-request on), rather than when the counts drop at the
   * next write or flush; the allocator says which (Allocator.takeUnreferenced) and leaves them out
   * of the later freedRuns.
   */
  private async punchUnreferenced(): Promise<void> {
    if (!this.refcounts.takeUnreferenced || !this.refcounts.hasPendingFrees) return;
    await this.punchRuns(await this.refcounts.takeUnreferenced());
  }

  /**
   * Run `step`, which drops counts at once under exclusive() (deleting a snapshot), then punch the
   * clusters it left unreferenced when `reason` passes discards on, as QEMU does.
   */
  async dropCounts(reason: FreeReason, step: () => Promise<void>): Promise<void> {
    if (!this.refcounts.collectFreedBy) return step();
    await this.punchRuns(await this.refcounts.collectFreedBy(reason, step));
  }

  /**
   * External data-file clusters a discard or an unmapping zero write just unmapped (`runs`, in
   * the data file), as QEMU passes them on: discarded there when pass-discard-request says so;
   * a raw data file's zero write always makes them zeros (the file is the guest disk, and must
   * read as the image does), by a punched hole or, where the file cannot have one, by zeros.
   */
  private async discardInDataFile(runs: ReadonlyArray<[number, number]>, isDiscard: boolean): Promise<void> {
    if (runs.length === 0) return;
    const mustZero = this.image.dataFileRaw && !isDiscard;
    if (!mustZero && !passesDiscard({ ...DEFAULT_DISCARD_PASSTHROUGH, ...this.parts.discardPassthrough }, 'request')) return;
    const store = this.image.dataStore;
    for (const [offset, length] of runs) {
      try {
        if (store.punchHole) {
          await store.punchHole(offset, length);
          continue;
        }
      } catch (e) {
        if (!(e instanceof QcowError && e.code === 'QCOW_UNSUPPORTED')) throw e;
      }
      if (mustZero) await store.write(offset, new Uint8Array(length));
    }
  }

  private async punchRuns(runs: ReadonlyArray<[number, number]>): Promise<void> {
    const store = this.image.store;
    if (!store.punchHole || this.external) return;
    for (const [offset, length] of runs) {
      try {
        await store.punchHole(offset, length);
      } catch (e) {
        // A filesystem without hole punching keeps the blocks, as before.
        if (e instanceof QcowError && e.code === 'QCOW_UNSUPPORTED') return;
        throw e;
      }
    }
  }

  /**
   * Why every metadata write is refused (the inactive L2 check that cannot be made: a snapshot's
   * L1 table QEMU refuses, see overlap.ts), or undefined.
   */
  private async metadataRefusal(): Promise<QcowError | undefined> {
    const overlap = this.map.overlap;
    if (!overlap) return undefined;
    if (overlap.inactiveL2Stale) await overlap.loadInactiveL2();
    return overlap.refusal;
  }

  /** Refcount changes wait to be written (dirty blocks, or frees not applied yet). */
  private get refcountsWaiting(): boolean {
    const rc = this.refcounts as { dirty?: boolean };
    return rc.dirty === true || this.refcounts.hasPendingFrees;
  }

  /** Write refcounts back (see ClusterMap.writeRefcounts). */
  writeRefcounts(): Promise<boolean> {
    return this.map.writeRefcounts(this.barrier);
  }

  /** Lazy refcounts: the dirty bit must be on disk before the first refcount goes stale. */
  private beforeMetadataChange(): Promise<void> | undefined {
    // Undefined (nothing to wait for) in the common case: callers then skip the await, one
    // promise and one suspension less per guest write.
    if (this.dirtyBitSet || !this.lazyRefcounts) return undefined;
    return this.setDirtyBit();
  }

  private async setDirtyBit(): Promise<void> {
    await this.image.writeHeader((h) => {
      h.incompatibleFeatures |= INCOMPAT_DIRTY;
    });
    await this.image.store.flush();
    this.dirtyBitSet = true;
  }

  // --- backing file and emptying (rebase, commit) ---------------------------------------------------

  /**
   * Point the image at another backing file (or none) by rewriting the header in place, as
   * qemu-img rebase does; nothing else changes. The header stays one cluster: a name that does
   * not fit is refused before anything is written.
   */
  setBacking(name: string | null, format: string | null): Promise<void> {
    return this.locked(async () => {
      if (name !== null && this.image.dataFileRaw) throw unsupported('qcow2: an image with a raw external data file cannot have a backing file');
      await this.image.writeHeader((h) => {
        h.backingFile = name ?? undefined;
        h.backingFormat = name === null ? undefined : (format ?? undefined);
      });
      await this.image.store.flush();
    });
  }

  /**
   * Deallocate every cluster of the active image so all of it reads from the backing image again
   * (qemu-img commit empties the overlay this way). Entries become 0, never zero flags, which
   * would hide the backing data; references are dropped through the usual deferred path, so the
   * crash-safety order of write-back still holds.
   */
  makeEmpty(): Promise<void> {
    if (!this.external && canEmptyCompletely(this.image)) return this.exclusive(() => this.emptyCompletely());
    return this.locked(async () => {
      if (this.external) throw unsupported('qcow2: cannot empty an image with an external data file');
      await this.beforeMetadataChange();
      await this.map.deallocateAll();
    });
  }

  /**
   * makeEmpty's way when the whole file can be rebuilt (make-empty.ts): the metadata is on disk
   * (exclusive), the file is rebuilt, then this writer takes the new, empty tables and counts.
   * A failure after the old structures were overwritten leaves nothing this writer holds true:
   * it gives the image up for the session (`ejected`), writing nothing more, as QEMU ejects the
   * node; the next open repairs the image (it is left dirty).
   */
  private async emptyCompletely(): Promise<void> {
    const { image, map } = this;
    let rebuilt: { metadataClusters: number };
    try {
      rebuilt = await rebuildEmpty(image);
    } catch (e) {
      if (!(e instanceof EmptyingFailed)) throw e;
      if (e.broken) this.ejectedBy = e.failure instanceof Error ? e.failure : new Error(String(e.failure));
      throw e.failure;
    }
    try {
      const h = image.header;
      map.l2Cache.clear();
      map.replaceL1(new Uint8Array(h.l1Size * 8));
      const rc = await Refcounts.load(image.store, { clusterSize: this.cs, refcountBits: 2 ** h.refcountOrder, tableOffset: h.refcountTableOffset, tableClusters: 1, cacheBytes: map.cacheBytes / 4 });
      rc.setDiscardPassthrough?.({ ...DEFAULT_DISCARD_PASSTHROUGH, ...this.parts.discardPassthrough });
      map.replaceRefcounts(rc);
      await rc.update(0, rebuilt.metadataClusters * this.cs, 1);
      await this.writeRefcounts();
      await this.barrier();
      this.dirtyBitSet = false;
      this.unmapFreesPending = false;
      await finishEmptying(image, rebuilt.metadataClusters);
    } catch (e) {
      this.ejectedBy = e instanceof Error ? e : new Error(String(e));
      throw e;
    }
  }

  /** Set when a complete emptying failed midway (see emptyCompletely): the image is given up. */
  private ejectedBy: Error | undefined;

  /** The failure that made this writer give the image up for the session, if one did. */
  get ejected(): Error | undefined {
    return this.ejectedBy;
  }

  // --- guest writes ------------------------------------------------------------------------------

  /**
   * `deferred`: when given, data writes that need nothing after them but the L2 entry (whole fresh
   * clusters, no copy-on-write, no encryption or subclusters) are started and pushed there instead
   * of awaited, so the caller can release the lock while they run. Their entries are set at once:
   * every L2 write-back (flush, eviction: beforeL2Write) first waits for them, which keeps "data
   * before the entry that points at it" on disk; a concurrent request to the same cluster sees a
   * COPIED normal entry and writes in place, any order of two overlapping requests being valid.
   */
  private async writeLocked(offset: number, bytes: Uint8Array | Payload, deferred?: Promise<void>[]): Promise<void> {
    const data = bytes instanceof Uint8Array ? new BytesPayload(bytes) : bytes;
    const dirtying = this.beforeMetadataChange();
    if (dirtying) await dirtying;
    const end = offset + data.length;
    for (let pos = offset; pos < end; ) {
      const sliceEnd = Math.min(end, this.map.sliceEnd(pos));
      const table = (await this.map.l2ForWrite(pos))!;
      // Most requests lie within one slice: they pass on as they came (no view, no payload object).
      const part = pos === offset && sliceEnd === end ? data : data.slice(pos - offset, sliceEnd - offset);
      await this.writeInTable(table, pos, part, deferred);
      pos = sliceEnd;
    }
  }

  private async writeInTable(table: CachedTable, start: number, data: Payload, deferred?: Promise<void>[]): Promise<void> {
    if (this.freshRun(table, start, data.length)) return this.writeFresh(table, start, data, deferred);
    const g = this.image.geometry;
    const cs = this.cs;
    const end = start + data.length;
    const align = this.image.encryption ? 512 : 1;
    const pieces: Piece[] = [];
    for (let c = start - (start % cs); c < end; c += cs) {
      const index = this.map.sliceIndex(c);
      const old = this.map.entry(table, index);
      const s = Math.max(start, c);
      const e = Math.min(end, c + cs);
      if (old.hostOffset % cs !== 0 && (old.kind === 'normal' || old.kind === 'zero-alloc')) this.refuseUnaligned(table, index, old, s, e - s === cs);
      // A contradictory subcluster bitmap anywhere in the request fails it before anything is
      // written, as QEMU's write path judges every entry a write touches.
      if (l2EntryInvalid(old, g.extendedL2)) throw this.map.invalidEntry(table, index, 'write');
      const p: Piece = { index, clusterGuest: c, ws: s, we: e, alloc: false, host: 0, old, subMask: 0n };
      const ownHost = old.kind === 'normal' || old.kind === 'zero-alloc';
      if (ownHost && (l2EntryCopied(old) || this.external)) {
        p.host = old.hostOffset;
        if (old.kind === 'zero-alloc') {
          p.ws = c;
          p.we = c + cs;
        } else {
          p.ws = s - ((s - c) % align);
          p.we = Math.min(c + cs, e + ((align - ((e - c) % align)) % align));
        }
      } else {
        p.alloc = true;
        // With subclusters, a fresh cluster only needs the touched subclusters; otherwise (and
        // when replacing compressed or shared data) the whole cluster is written.
        if (g.extendedL2 && (old.kind === 'unallocated' || old.kind === 'zero-plain')) {
          p.ws = s - ((s - c) % g.subclusterSize);
          p.we = Math.min(c + cs, e + ((g.subclusterSize - ((e - c) % g.subclusterSize)) % g.subclusterSize));
        } else if (g.extendedL2 && old.kind === 'normal') {
          // A shared cluster with subclusters: the new one takes the written subclusters and the
          // allocated ones around them (QEMU's calculate_l2_meta copies from the first allocated
          // subcluster to the last); the rest keep what their bits say, reading through.
          const alloc = old.allocBitmap >>> 0;
          const firstSc = Math.floor((s - c) / g.subclusterSize);
          const lastSc = Math.floor((e - 1 - c) / g.subclusterSize);
          const lowest = alloc === 0 ? 32 : 31 - Math.clz32(alloc & -alloc);
          const highest = alloc === 0 ? -1 : 31 - Math.clz32(alloc);
          p.ws = c + Math.min(firstSc, lowest) * g.subclusterSize;
          p.we = c + (Math.max(lastSc, highest) + 1) * g.subclusterSize;
        } else {
          p.ws = c;
          p.we = c + cs;
        }
      }
      if (g.extendedL2 && old.kind !== 'compressed') {
        const first = Math.floor((p.ws - c) / g.subclusterSize);
        const last = Math.floor((p.we - 1 - c) / g.subclusterSize);
        // An in-place write into a subcluster that is not allocated yet copies the rest of it.
        if (!p.alloc) {
          const alloc = old.allocBitmap >>> 0;
          if (!((alloc >>> first) & 1)) p.ws = c + first * g.subclusterSize;
          if (!((alloc >>> last) & 1)) p.we = c + (last + 1) * g.subclusterSize;
        }
        for (let k = first; k <= last; k++) p.subMask |= 1n << BigInt(k);
      }
      pieces.push(p);
    }
    // Nothing is written when a cluster written in place holds metadata (QEMU checks each data
    // write; new clusters are vetted as they are allocated).
    for (const p of pieces) {
      const refused = p.alloc ? undefined : this.overlapsMetadata(p.host + (p.ws - p.clusterGuest), p.we - p.ws);
      if (refused instanceof QcowError) throw refused;
      if (refused !== undefined) throw new CorruptionEvent(refused);
    }
    // Allocate runs of neighbouring clusters together so sequential writes stay contiguous.
    for (let i = 0; i < pieces.length; ) {
      if (!pieces[i]!.alloc) {
        i++;
        continue;
      }
      let j = i;
      while (j + 1 < pieces.length && pieces[j + 1]!.alloc) j++;
      const n = j - i + 1;
      const base = this.external ? pieces[i]!.clusterGuest : await this.allocAfter(i > 0 ? pieces[i - 1]! : undefined, n);
      for (let k = i; k <= j; k++) pieces[k]!.host = base + (k - i) * cs;
      i = j + 1;
    }
    this.map.noteGrowth();
    // Runs whose data write may still be running when the entries are set (see writeLocked):
    // should one fail, its entries go back (unlinkRun), and only once it lands are the clusters it
    // replaces given up. One that settles before the entries are set is linked as it ended. When
    // the request fails before linking (`aborted`), its new clusters go back, each once nothing
    // writes to it any more.
    let linked = false;
    let aborted = false;
    const late = new Map<Piece, LateRun>();
    try {
      // Write runs whose guest windows and host clusters both continue, one store write each.
      for (let i = 0; i < pieces.length; ) {
        let j = i;
        while (
          j + 1 < pieces.length &&
          pieces[j]!.we === pieces[j + 1]!.ws &&
          pieces[j]!.host + (pieces[j]!.we - pieces[j]!.clusterGuest) === pieces[j + 1]!.host + (pieces[j + 1]!.ws - pieces[j + 1]!.clusterGuest)
        )
          j++;
        const run = pieces.slice(i, j + 1);
        const plain = deferred && !this.image.encryption && !g.extendedL2 && run[0]!.ws >= start && run[run.length - 1]!.we <= end;
        if (plain) {
          const lr: LateRun = { state: 'running' };
          for (const p of run) late.set(p, lr);
          const settled = this.writeRun(run, start, data).then(
            async () => {
              if (aborted) await this.abandonPieces(run);
              else if (!linked) lr.state = 'written';
              else for (const p of run) if (p.alloc) this.map.release(p.old, 'never');
            },
            async (e: unknown) => {
              if (aborted) await this.abandonPieces(run);
              else if (!linked) lr.state = 'failed';
              else await this.unlinkRun(table, run);
              throw e;
            },
          );
          deferred.push(this.track(settled));
          // Its new clusters are linked before the write lands: later requests on them wait.
          const landed = settled.then(noop, noop);
          for (const p of run) if (p.alloc) this.noteAllocating(p.clusterGuest / cs, 1, landed);
        } else await this.writeRun(run, start, data);
        i = j + 1;
      }
    } catch (e) {
      // No entry was set: every cluster allocated for the request goes back (QEMU's abort), those
      // of late runs still running once they end.
      aborted = true;
      await this.abandonPieces(pieces.filter((p) => late.get(p)?.state !== 'running'));
      throw e;
    }
    // Data is written (or, for the late runs, on its way): point the entries at it.
    linked = true;
    for (const p of pieces) {
      const old = p.old;
      const state = late.get(p)?.state;
      if (state === 'failed') {
        if (p.alloc) await this.abandonClusters(p.host, 1);
        continue;
      }
      if (state === 'running') {
        p.oldRaw = table.data.slice(p.index * 8, p.index * 8 + 8);
        setCopiedNormalEntry(table.data, p.index, p.host);
        continue;
      }
      if (g.extendedL2) {
        // The written subclusters become allocated and lose their zero bits; the others keep
        // theirs (a compressed cluster's bitmap means nothing: the new one is allocated whole).
        const bitmap = old.kind === 'compressed' ? ALL_SUBCLUSTERS : (l2EntryBitmap(old) | p.subMask) & ~(p.subMask << 32n);
        // Overwriting allocated subclusters in place changes nothing in the entry (QEMU leaves
        // it as it is, stray flag bits included).
        if (!p.alloc && bitmap === l2EntryBitmap(old)) continue;
        this.map.setEntry(table, p.index, standardL2Entry(p.host, { copied: true }), bitmap);
      } else {
        setCopiedNormalEntry(table.data, p.index, p.host);
      }
      if (p.alloc) this.map.release(old, 'never');
    }
    await this.map.tableChanged(table);
    this.io.forgetCompressed();
  }

  /**
   * A late run's data write failed after its entries were set (writeInTable): each entry that
   * still points where the run wrote gets its old bytes back (a preallocated zero cluster stays
   * one, as in QEMU), and the clusters allocated for it are freed.
   */
  private async unlinkRun(table: CachedTable, run: readonly Piece[]): Promise<void> {
    const gone: Piece[] = [];
    for (const p of run) {
      if (!p.oldRaw || !isCopiedNormalEntry(table.data, p.index, p.host)) continue;
      table.data.set(p.oldRaw, p.index * 8);
      if (p.alloc) gone.push(p);
    }
    for (const p of gone) await this.abandonLinked(p.host, 1);
  }

  /** abandonClusters for the new clusters of pieces that were never linked. */
  private async abandonPieces(pieces: readonly Piece[]): Promise<void> {
    for (const p of pieces) if (p.alloc) await this.abandonClusters(p.host, 1);
  }

  /**
   * True when [start, +length) is whole clusters whose entries in `table` are all empty (never
   * written, nothing shows through them from this layer), of an image whose clusters are plain
   * bytes at their host offset: what every chunk of a convert into a new image is. writeFresh
   * then does what writeInTable would, without a descriptor and a plan per cluster (that
   * per-cluster work, and V8 optimising the large general function for it, was most of the
   * JavaScript time of a 1 GiB raw -> qcow2 convert).
   */
  private freshRun(table: CachedTable, start: number, length: number): boolean {
    const cs = this.cs;
    const g = this.image.geometry;
    if (length === 0 || start % cs !== 0 || length % cs !== 0 || g.extendedL2 || this.image.encryption || this.external) return false;
    // Byte offsets inside one L2 table (at most 2 MiB), so `| 0` loses nothing. It keeps them
    // small integers: optimised, the divisions made doubles, passed on boxed, and without the
    // host addon firstNonZero's JavaScript loop, compiled on stack for small integers, threw its
    // code away at every call (1024 deoptimisations in a 1 GiB convert, QCOW_NO_NATIVE=1).
    const first = (((start % this.map.slice.coverage) / cs) * 8) | 0;
    const end = (first + (length / cs) * 8) | 0;
    // One shared word scan (core/bytes.ts), not a loop of its own: this runs once per request,
    // and a loop here made V8 optimise it (and the callers it is inlined into) on the main thread.
    return firstNonZero(table.data, first, end) === end;
  }

  /** writeInTable for a fresh run (see freshRun): one allocation, one write, then the entries. */
  private async writeFresh(table: CachedTable, start: number, data: Payload, deferred?: Promise<void>[]): Promise<void> {
    const cs = this.cs;
    const n = data.length / cs;
    // Allocation without a suspension when the allocator can (a growing image, every request of
    // a convert or of allocating guest writes), else the general path.
    if (deferred && this.freshNow(table, start, data, deferred)) {
      await this.map.tableChanged(table);
      return;
    }
    const rc = this.refcounts;
    let host = rc.allocClustersNow ? rc.allocClustersNow(n) : -1;
    if (host === -1) host = await rc.allocClusters(n);
    this.map.noteGrowth();
    const first = (start % this.map.slice.coverage) / cs;
    // As writeInTable: the data before the entries that point at it (deferred ones are waited
    // for by every L2 write-back, see writeLocked).
    if (deferred) deferred.push(this.trackFresh(this.writeFreshData(start, host, data), table, first, n, host, start));
    else {
      try {
        await this.writeFreshData(start, host, data);
      } catch (e) {
        // Nothing links the clusters yet: they go back, as QEMU aborts a failed allocation.
        await this.abandonClusters(host, n);
        throw e;
      }
    }
    setCopiedNormalRun(table.data, first, n, host, cs);
    await this.map.tableChanged(table);
    this.io.forgetCompressed();
  }

  /**
   * writeFresh's whole work but telling the cache of the table's change, in one synchronous step,
   * when the allocator can hand out the clusters at once; false (nothing done) otherwise. The data
   * write is started and pushed to `deferred`; the entries are set at once, which is safe for the
   * reason writeLocked gives (every L2 write-back first waits for the writes in flight). The
   * caller then awaits map.tableChanged(table).
   */
  private freshNow(table: CachedTable, start: number, data: Payload, deferred: Promise<void>[]): boolean {
    const cs = this.cs;
    const n = data.length / cs;
    const rc = this.refcounts;
    const host = rc.allocClustersNow ? rc.allocClustersNow(n) : -1;
    if (host === -1) return false;
    this.map.noteGrowth();
    const first = (start % this.map.slice.coverage) / cs;
    deferred.push(this.trackFresh(this.writeFreshData(start, host, data), table, first, n, host, start));
    setCopiedNormalRun(table.data, first, n, host, cs);
    this.io.forgetCompressed();
    return true;
  }

  /**
   * track() for the data write of a fresh run whose entries (`n` from `first` in `table`, pointing
   * at `host` on) are set before it lands: should it fail, abortFresh unlinks the run before the
   * write counts as settled, so no L2 write-back (each waits for the writes in flight) can carry
   * entries to clusters never written. One closure per request, made only here.
   */
  private trackFresh(p: Promise<void>, table: CachedTable, first: number, n: number, host: number, guestStart: number): Promise<void> {
    this.inFlight++;
    const settled = p.then(this.untrack, () => this.abortFresh(table, first, n, host).then(this.untrack, this.untrack));
    this.noteAllocating(guestStart / this.cs, n, settled);
    return p;
  }

  /**
   * Guest clusters `n` from index `first` are being allocated by a data write in flight whose
   * entries are already set; `settled` resolves once it has landed or been undone (never rejects).
   */
  private noteAllocating(first: number, n: number, settled: Promise<void>): void {
    const allocating = this.allocating;
    // The general path notes its pieces one cluster at a time: adjacent ones of one write join.
    const last = allocating[allocating.length - 1];
    if (last !== undefined && last.settled === settled && last.end === first) {
      last.end = first + n;
      return;
    }
    const run: AllocatingRun = { first, end: first + n, settled };
    allocating.push(run);
    // Registered before any dependent's wait (dependency hands out `settled` only after this), so
    // the clusters are off the list by the time a dependent tries again.
    void settled.then(() => {
      const i = allocating.indexOf(run);
      if (i >= 0) allocating.splice(i, 1);
    });
  }

  /**
   * What a request on [offset, +length) must wait for before it decides anything: the allocation
   * in flight of one of its clusters, if any (QEMU's dependency of a request on an l2meta in
   * flight). Such a cluster looks allocated (its entry is set), so a write would write into it in
   * place and be told it succeeded; should the allocating write then fail, its undo would unlink
   * the cluster under the request's data. A read (DataIo.read) would read the new host
   * cluster before the data lands there: a hole (zeros), or, for a cluster freed and reused, the
   * bytes it held for another guest offset; QEMU's read sees the old mapping until the data has
   * landed. After the wait the request starts over. Almost always the list is empty: one length
   * test, the cost every read pays.
   */
  dependency(offset: number, length: number): Promise<void> | undefined {
    const allocating = this.allocating;
    if (allocating.length === 0 || length === 0) return undefined;
    const first = Math.floor(offset / this.cs);
    const end = Math.floor((offset + length - 1) / this.cs) + 1;
    // Indexed: a for-of made an iterator object per call, and this runs at every request.
    for (let i = 0; i < allocating.length; i++) {
      const r = allocating[i]!;
      if (r.first < end && r.end > first) return r.settled;
    }
    return undefined;
  }

  /** Wait, under the lock, until no cluster of [offset, +length) has its allocation in flight (they settle without it). */
  private async settleDependencies(offset: number, length: number): Promise<void> {
    for (let dep = this.dependency(offset, length); dep; dep = this.dependency(offset, length)) await dep;
  }

  /**
   * A fresh run's data write failed (EIO, ENOSPC): as QEMU aborts the allocation of a failed
   * write (qcow2_alloc_cluster_abort), its entries become empty again and its clusters are freed.
   * Only entries that still point at the run are touched: a discard or zero write may have
   * replaced them meanwhile (and dropped their references itself).
   */
  private async abortFresh(table: CachedTable, first: number, n: number, host: number): Promise<void> {
    const cs = this.cs;
    // The entries first, all in this synchronous step: nothing may see them half undone.
    const runs: Array<[number, number]> = [];
    for (let k = 0; k < n; k++) {
      if (!isCopiedNormalEntry(table.data, first + k, host + k * cs)) continue;
      table.data.fill(0, (first + k) * 8, (first + k + 1) * 8);
      const last = runs[runs.length - 1];
      if (last && last[0] + last[1] * cs === host + k * cs) last[1]++;
      else runs.push([host + k * cs, 1]);
    }
    for (const [at, count] of runs) await this.abandonLinked(at, count);
  }

  /**
   * abandonClusters for clusters whose entries were visible for a while: another request may
   * have started a write into them in place. Their counts drop at once only when no other write
   * can be running (this one is the only one in flight and no one holds or waits for the lock);
   * otherwise the drop waits, as for any free, until the writes in flight are done and the tables
   * written (applyPendingFrees), so the clusters are not reused under a late write; the next
   * allocating write settles it first (as after a discard) and so still reuses them, as QEMU does.
   */
  private async abandonLinked(host: number, n: number): Promise<void> {
    const quiet = this.inFlight === 1 && this.waiting.length === 0 && !this.serving && this.lock.mayOvertake;
    if (quiet) return this.abandonClusters(host, n);
    if (this.external) return;
    this.knownFileEnd = Math.min(this.knownFileEnd, host);
    this.refcounts.free(host, n * this.cs, 'never');
    this.unmapFreesPending = true;
  }

  /**
   * Give back `n` clusters from `host` that a failed data write allocated and nothing links, in
   * memory or on disk (no L2 write-back runs while the write is in flight, see beforeL2Write), and
   * nothing writes to any more: as
   * QEMU's abort of the allocation, their counts drop at once, so the next write reuses them. A
   * count that cannot be dropped leaves a leak, which check -r repairs. The file may end before
   * them now (knownFileEnd is a lower bound).
   */
  private async abandonClusters(host: number, n: number): Promise<void> {
    if (this.external) return;
    this.knownFileEnd = Math.min(this.knownFileEnd, host);
    try {
      await this.refcounts.update(host, n * this.cs, -1);
    } catch {
      // Left as a leak.
    }
  }

  private async writeFreshData(start: number, host: number, data: Payload): Promise<void> {
    const place = data.placer();
    const held = this.image.store.debugEvent?.('write_aio');
    if (held) await held;
    if (place) await place(this.image.dataStore, 0, data.length, host, start);
    else await this.image.dataStore.write(host, data.bytes(0, data.length));
    // Whole clusters were written: the file reaches the last one's end.
    this.knownFileEnd = Math.max(this.knownFileEnd, host + data.length);
  }

  /** Write one run of pieces: the request's bytes plus, around them, the current guest content. */
  private async writeRun(run: Piece[], start: number, data: Payload): Promise<void> {
    const ws = run[0]!.ws;
    const we = run[run.length - 1]!.we;
    const host = run[0]!.host + (ws - run[0]!.clusterGuest);
    // Nothing to merge around the request's bytes: write them from the caller's buffer, no copy
    // (or have them copied into place). Encrypted images keep the copy: the cipher must not
    // touch the caller's buffer.
    const direct = !this.image.encryption && ws >= start && we <= start + data.length;
    const place = direct ? data.placer() : null;
    if (place) await place(this.image.dataStore, ws - start, we - start, host, ws);
    else {
      const buf = direct ? data.bytes(ws - start, we - start) : new Uint8Array(we - ws);
      const ds = Math.max(ws, start);
      const de = Math.min(we, start + data.length);
      if (ws < ds) await this.readCurrent(ws, buf.subarray(0, ds - ws));
      if (de < we) await this.readCurrent(de, buf.subarray(de - ws));
      if (!direct) buf.set(data.bytes(ds - start, de - start), ds - ws);
      await this.io.writeData(ws, host, buf);
    }
    if (this.external) return;
    // A fresh cluster must exist in the file to its end even where we wrote only a part.
    // `knownFileEnd` is a lower bound of the file's length (it only grows while we hold the
    // image), so the common case, a whole cluster just written, needs no fstat per request.
    this.knownFileEnd = Math.max(this.knownFileEnd, host + (we - ws));
    const last = run[run.length - 1]!;
    const clusterEnd = last.host + this.cs;
    if (!last.alloc || clusterEnd <= this.knownFileEnd) return;
    const size = await this.image.store.size();
    if (clusterEnd > size) await this.image.store.truncate(clusterEnd);
    this.knownFileEnd = Math.max(size, clusterEnd);
  }

  /** Guest bytes as they read now, through this layer (used to fill copy-on-write gaps). */
  private async readCurrent(offset: number, into: Uint8Array): Promise<void> {
    const runs = await this.map.mapRuns(offset, into.length);
    for (const r of runs) await this.io.readRun(r, into.subarray(r.offset - offset, r.offset - offset + r.length));
  }

  // --- zeroes and discard ------------------------------------------------------------------------

  private async zeroLocked(offset: number, length: number, options: ZeroOptions, isDiscard: boolean): Promise<void> {
    const cs = this.cs;
    const v3 = this.image.header.version === 3;
    const hasBacking = this.parts.hasBacking();
    const first = Math.ceil(offset / cs) * cs;
    // A discard reaching the image's end takes its last, partial cluster too (qemu's exception
    // to dropping the partial clusters of a discard).
    const end = offset + length;
    const last = isDiscard && end === this.image.size ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
    const whole = first < last;
    // What whole clusters turn into: v3 zero flags; v2 deallocation when nothing shows through.
    const canFlag = v3 || !hasBacking;
    if (isDiscard) {
      if (!whole || !canFlag) return;
      await this.beforeMetadataChange();
      await this.discardInDataFile(await this.map.zeroClusters(first, last, true, isDiscard, hasBacking), true);
      if (this.refcounts.hasPendingFrees) this.unmapFreesPending = true;
      try {
        await this.punchUnreferenced();
      } catch (e) {
        if (!(e instanceof CorruptionEvent)) throw e;
        // QEMU's qcow2_free_clusters meets the corrupt refcount structure: the event marks the
        // image, the failure is only a warning, and the discard of the whole clusters stands. A
        // partial last cluster is a request of its own in QEMU's block layer, which then finds
        // the image given up (ENOMEDIUM).
        await this.markCorrupt(e);
        this.parts.onWarning?.('qcow2_free_clusters failed: Input/output error');
        if (end > last) throw new ImageMarkedCorrupt(e, this.image.store.name);
      }
      return;
    }
    if (this.image.geometry.extendedL2) return this.zeroSubclusters(offset, length, options, hasBacking);
    // The request cluster by cluster, as qemu's block layer splits it: a partial head, the whole
    // clusters, a partial tail. A partial cluster is made zero whole, as qemu does, when the rest
    // of it already reads as zeros and this layer holds no data there; otherwise its part is
    // written as zero bytes (qemu's fallback).
    const pieces: Array<{ s: number; e: number; whole: boolean }> = [];
    for (let c = offset - (offset % cs); c < end; c += cs) {
      const s = Math.max(offset, c);
      const e = Math.min(end, c + cs);
      // The image's last cluster ends at the image's end (qemu counts no tail there).
      const isWhole = s === c && (e === c + cs || e === this.image.size);
      const prev = pieces[pieces.length - 1];
      if (isWhole && prev?.whole) prev.e = e;
      else pieces.push({ s, e, whole: isWhole });
    }
    const zeroable = await Promise.all(pieces.map((p) => (p.whole ? canFlag : this.partialZeroable(p.s, p.e, canFlag))));
    if (options.fastOnly && zeroable.includes(false)) throw unsupported('qcow2: this zero write cannot be done without writing data');
    for (const [i, p] of pieces.entries()) {
      if (!zeroable[i]) {
        await this.writeLocked(p.s, new Uint8Array(p.e - p.s));
        continue;
      }
      const from = p.s - (p.s % cs);
      await this.beforeMetadataChange();
      await this.discardInDataFile(await this.map.zeroClusters(from, p.whole ? p.e : from + cs, options.mayUnmap ?? false, false, hasBacking), false);
      if (options.mayUnmap && this.refcounts.hasPendingFrees) this.unmapFreesPending = true;
    }
    await this.punchUnreferenced();
  }

  /**
   * Whether a zero write of [s, e), part of one cluster, may zero the whole cluster: the rest of
   * it (up to the image's end) reads as zeros through the whole chain and this layer holds no data
   * in it (qemu's qcow2_co_pwrite_zeroes test for an unaligned request). Images with extended L2
   * entries take zeroSubclusters instead.
   */
  private async partialZeroable(s: number, e: number, canFlag: boolean): Promise<boolean> {
    if (!canFlag) return false;
    const c = s - (s % this.cs);
    const ce = Math.min(c + this.cs, this.image.size);
    const here = await this.parts.layerStatus(c, ce - c);
    if (here.some((x) => x.allocated && !x.zero)) return false;
    return (await this.parts.chainReadsZero(c, s - c)) && (await this.parts.chainReadsZero(e, ce - e));
  }

  /**
   * A zero write on an image with extended L2 entries, as QEMU 7.2 does it: its block layer cuts
   * the request at subcluster boundaries (a partial head, the aligned middle, a partial tail) and
   * offers each part to the driver, which sets zero bits (zeroSubclusterPart); a part the driver
   * refuses is written as zero bytes instead, through the ordinary write path (copy-on-write
   * included). Unmapping drops only whole clusters: a partial cluster keeps its host cluster.
   */
  private async zeroSubclusters(offset: number, length: number, options: ZeroOptions, hasBacking: boolean): Promise<void> {
    const a = this.image.geometry.subclusterSize;
    const end = offset + length;
    // QEMU's limits: one driver request stays below 2 GiB, one fallback write below 16 MiB.
    const maxZero = Math.floor(0x7fffffff / a) * a;
    const bounce = 16 * 1024 * 1024;
    let head = offset % a;
    const tail = end % a;
    try {
      for (let pos = offset; pos < end; ) {
        let n = end - pos;
        if (head) {
          n = Math.min(n, a - head);
          head = (head + n) % a;
        } else if (tail && n > a) n -= tail;
        n = Math.min(n, maxZero);
        if (!(await this.zeroSubclusterPart(pos, n, options.mayUnmap ?? false, hasBacking))) {
          if (options.fastOnly) throw unsupported('qcow2: this zero write cannot be done without writing data');
          n = Math.min(n, bounce);
          // Clusters this request gave up so far (a compressed cluster decompressed by a part
          // before, one unmapped by this part) are free for the data write, as in QEMU, whose
          // counts drop at once: the write fills them instead of growing the file.
          if (this.refcounts.hasPendingFrees) await this.settleFrees();
          await this.writeLocked(pos, new Uint8Array(n));
        }
        pos += n;
      }
    } finally {
      if (options.mayUnmap && this.refcounts.hasPendingFrees) this.unmapFreesPending = true;
    }
    await this.punchUnreferenced();
  }

  /**
   * One part of a zero write (see zeroSubclusters) made zero through the subcluster bitmaps, as
   * QEMU's qcow2_co_pwrite_zeroes: a part that covers a subcluster only partly zeroes all of it,
   * and only when the rest already reads as zeros through the whole chain and the subcluster
   * holds no data here. False when the part must be written as data instead (then the entries
   * this call changed before it met a compressed cluster stay changed, as in QEMU; the data write
   * that follows covers them).
   */
  private async zeroSubclusterPart(s: number, n: number, unmap: boolean, hasBacking: boolean): Promise<boolean> {
    const a = this.image.geometry.subclusterSize;
    const size = this.image.size;
    const head = s % a;
    const tail = s + n === size ? 0 : (a - ((s + n) % a)) % a;
    if (head || tail) {
      if (!(await this.parts.chainReadsZero(s - head, head)) || !(await this.parts.chainReadsZero(s + n, tail))) return false;
      s -= head;
      n = a;
      const [run] = await this.map.mapRuns(s, 1);
      const kind = run?.kind ?? 'unallocated';
      if (kind !== 'unallocated' && kind !== 'unallocated-alloc' && kind !== 'zero-plain' && kind !== 'zero-alloc') return false;
    }
    await this.beforeMetadataChange();
    return this.zeroizeSubclusters(s, n, unmap, hasBacking);
  }

  /**
   * [o, o + n), subcluster aligned (but for the image's end), made zero in the tables (QEMU's
   * qcow2_subcluster_zeroize): the partial clusters at either end get zero bits for their
   * subclusters (their allocation bits cleared, the host cluster kept), the whole clusters between
   * become all-zero entries (unmapped when `unmap` or compressed). False, with the changes so far
   * kept, when a partial cluster is compressed: its subclusters cannot be zeroed alone.
   */
  private async zeroizeSubclusters(o: number, n: number, unmap: boolean, hasBacking: boolean): Promise<boolean> {
    const cs = this.cs;
    const a = this.image.geometry.subclusterSize;
    const size = this.image.size;
    let end = o + n;
    const head = Math.min(end, Math.ceil(o / cs) * cs) - o;
    o += head;
    const tail = end >= size ? 0 : end - Math.max(o, end - (end % cs));
    end -= tail;
    if (head && !(await this.zeroSubclusterBits(o - head, Math.ceil(head / a)))) return false;
    if (end > o) await this.discardInDataFile(await this.map.zeroClusters(o, o + Math.ceil((end - o) / cs) * cs, unmap, false, hasBacking), false);
    if (tail && !(await this.zeroSubclusterBits(end, Math.ceil(tail / a)))) return false;
    return true;
  }

  /**
   * Subclusters [first, first + count) of the cluster holding guest offset `at` (its first
   * subcluster) read as zeros: zero bits set, allocation bits cleared, the entry's host cluster
   * kept (QEMU's zero_l2_subclusters). False for a compressed cluster.
   */
  private async zeroSubclusterBits(at: number, count: number): Promise<boolean> {
    const g = this.image.geometry;
    const table = (await this.map.l2ForWrite(at))!;
    const index = this.map.sliceIndex(at);
    const d = this.map.entry(table, index);
    if (d.kind === 'compressed') return false;
    // A raw external data file must read as the guest does: its bytes are zeroed first, as
    // QEMU's zeroize does (whole clusters get theirs in zeroClusters).
    const img = this.image;
    if (img.external && img.dataFileRaw) await img.dataStore.write(at, new Uint8Array(Math.max(0, Math.min(at + count * g.subclusterSize, img.size) - at)));
    const bits = subclusterRange(Math.floor((at % this.cs) / g.subclusterSize), count);
    const zero = d.zeroBitmap | bits;
    const alloc = d.allocBitmap & ~bits;
    if (zero === d.zeroBitmap && alloc === d.allocBitmap) return true;
    // Only bits that say "reads zeros" are added and only "allocated" bits removed: the entry
    // never claims data that is not there, whatever order the table and the data reach the disk.
    setL2Bitmap(table.data, index, zero, alloc);
    await this.map.tableChanged(table);
    return true;
  }

  // --- compressed clusters -------------------------------------------------------------------------

  private async compressedLocked(offset: number, data: Uint8Array, packedClusters: Uint8Array[], zstd: boolean): Promise<void> {
    const cs = this.cs;
    const image = this.image;
    if (this.external) throw unsupported('Operation not supported: compression with an external data file');
    await this.beforeMetadataChange();
    // The image's compression type cannot change while a write waits for the lock (amend runs
    // under it too), but say so loudly if it ever does.
    if (zstd !== (image.header.compressionType === COMPRESSION_ZSTD)) throw new QcowError('QCOW_INVALID_ARGUMENT', 'compression type changed during a compressed write');
    const g = image.geometry;
    for (let done = 0; done < data.length; done += cs) {
      const guest = offset + done;
      const chunk = data.subarray(done, Math.min(data.length, done + cs));
      const packed = packedClusters[done / cs]!;
      if (packed.length >= cs) {
        // As qemu: data that does not shrink is stored as a normal cluster.
        await this.writeLocked(guest, chunk);
        continue;
      }
      // The L2 table first, then the bytes: qemu allocates in that order, so a new table lands
      // before the compressed data in the file, where qemu's layout has it (iotest 214 pokes
      // the entries at their offsets). The table is asked for again below: the allocation and
      // the data write in between may have let the cache drop the slice.
      await this.map.l2ForWrite(guest);
      const host = await this.refcounts.allocBytes(packed.length);
      this.map.noteGrowth();
      // QEMU points the entry at the bytes (l2_update_compressed) and then writes them
      // (write_compressed); here the entry changes only once they are written, so a failed write
      // leaves no entry naming them, and its room is given back.
      image.store.debugEvent?.('l2_update_compressed');
      image.store.debugEvent?.('write_compressed');
      try {
        await image.store.write(host, packed);
      } catch (e) {
        await this.refcounts.unallocBytes?.(host, packed.length).catch(() => undefined);
        throw e;
      }
      const entry = encodeCompressedDescriptor(host, packed.length, g.clusterBits);
      const table = (await this.map.l2ForWrite(guest))!;
      const index = this.map.sliceIndex(guest);
      const old = this.map.entry(table, index);
      this.map.setEntry(table, index, entry, 0n);
      this.map.release(old, 'never');
      await this.map.tableChanged(table);
    }
    this.io.forgetCompressed();
  }
}

const noop = (): void => undefined;

/**
 * Entries [first, first + n) of an L2 table point at n consecutive host clusters from `host`
 * (COPIED normal entries). A function of its own so the per-cluster loop is optimised alone: in
 * the async writer it counted towards that function's tier-up budget, and V8 then compiled the
 * whole writer (with everything inlined into it) on the main thread, ~9 ms per convert.
 */
function setCopiedNormalRun(table: Uint8Array, first: number, n: number, host: number, cs: number): void {
  if (first < 0 || (first + n) * 8 > table.length) throw new RangeError(`L2 entries ${first}..${first + n} lie outside the table`);
  // Two big-endian word stores per entry through one DataView per run, not eight byte stores: in
  // a short convert this loop mostly runs in V8's baseline tier, where every byte store and every
  // shift is a call into a builtin (docs/performance.md, round sixteen).
  const dv = new DataView(table.buffer, table.byteOffset + first * 8, n * 8);
  for (let k = 0, h = host; k < n; k++, h += cs) {
    dv.setUint32(k * 8, (0x80000000 | Math.floor(h / 0x100000000)) >>> 0);
    dv.setUint32(k * 8 + 4, h % 0x100000000);
  }
}
