/**
 * The persistent dirty bitmaps of one qcow2 image: reading their contents, recording guest
 * writes in the enabled ones, and the edits of `qcow bitmap` (add, remove, clear, enable,
 * disable, merge). The directory and table codecs live beside it (directory.ts, table.ts); the
 * writer supplies allocation, refcounts and the header through `BitmapWriteHost`.
 *
 * Consistency, as QEMU keeps it: while a program may change an enabled bitmap without having
 * stored it, the bitmap is flagged `in_use` on disk, so a crash leaves it marked inconsistent
 * (QEMU then refuses to use it, and `remove` still works). Storing clears the flag.
 *
 * Crash safety: nothing the on-disk directory references is ever overwritten. Changed bitmap
 * data goes to fresh clusters (a cluster allocated since the last directory write may be
 * rewritten in place: nothing on disk points at it), tables are written anew, then the
 * refcounts and a barrier, then a new directory, then the header extension that names it; the
 * clusters the old directory referenced are freed only after that. A kill at any instant leaves
 * the old or the new directory, and at most leaked clusters.
 *
 * Memory: the directory (at most MAX_DIRECTORY_SIZE, as QEMU), each used bitmap's table (at most
 * MAX_PHYS_SIZE / cluster size entries, 8 MiB with 512-byte clusters, 64 KiB with 64 KiB ones),
 * a small cache of data clusters (`cacheClusters`), and the pending write ranges (at most
 * `maxPendingRanges`, then applied). A bitmap is never held whole: a 4 TiB disk with 64 KiB
 * granularity has 8 MiB of bitmap, of which at most `cacheClusters` clusters are in memory.
 */
import { QcowError, corrupt, invalidArgument, unsupported } from '../../../core/errors.js';
import { alignUp } from '../../../core/bytes.js';
import type { ByteStore } from '../../../storage/types.js';
import type { BitmapsExtension } from '../header.js';
import {
  FLAG_AUTO,
  FLAG_EXTRA_DATA_COMPATIBLE,
  FLAG_IN_USE,
  MAX_BITMAPS,
  MAX_DIRECTORY_SIZE,
  MAX_GRANULARITY_BITS,
  MAX_NAME_SIZE,
  MIN_GRANULARITY_BITS,
  TYPE_DIRTY_TRACKING,
  decodeDirectory,
  encodeDirectory,
  tableSizeFor,
  unusableReason,
  malformedReason,
  type BitmapEntry,
} from './directory.js';
import { ALL_ONE, ALL_ZERO, dataClusters, decodeTable, encodeTable } from './table.js';
import { allSet, bitRuns, setBits } from './bits.js';
import { RangeSet } from './ranges.js';
import { encodeUtf8 } from '../../../core/bytes.js';
import type { BitmapInfo, DirtyExtent } from '../../../core/bitmaps.js';

export interface BitmapReadHost {
  readonly store: ByteStore;
  readonly clusterSize: number;
  /** Virtual size of the disk. */
  readonly size: number;
  fileSize(): number;
}

/** What the qcow2 writer lends the bitmaps to change the image (all under its lock). */
export interface BitmapWriteHost extends BitmapReadHost {
  /** qcow2 v2 images cannot hold bitmaps (QEMU refuses to add one). */
  readonly canStore: boolean;
  alloc(clusters: number): Promise<number>;
  /** Drop one reference to every cluster of the range (applied once tables are on disk). */
  free(offset: number, length: number): void;
  /** Write refcounts back and make everything written so far durable. */
  commit(): Promise<void>;
  /** Point the header at this directory (or at none), durably. */
  setExtension(ext: BitmapsExtension | undefined): Promise<void>;
  /** Run `fn` under the writer's lock: for changes started outside it (a reader's extents()). */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
}

// What a bitmap and a run are is the capability's (core/bitmaps.ts), whichever format stores them.
export type { BitmapInfo, DirtyExtent };

export interface BitmapLimits {
  /** Data clusters kept for reading. */
  cacheClusters?: number;
  /** Write ranges held before they are applied to the bitmaps' clusters. */
  maxPendingRanges?: number;
}

/** One bitmap: its directory entry as found, and what changed since. */
interface Bitmap {
  entry: BitmapEntry;
  /** Loaded on first use. */
  table?: Float64Array;
  tableDirty: boolean;
  /** Recording guest writes in this session (flagged in_use on disk meanwhile). */
  tracked: boolean;
  /**
   * Held by this writable session without recording (a disabled bitmap): flagged in_use on disk
   * until stored at close, as QEMU 7.2 loads every bitmap of an image it opens for writing and
   * marks each in_use, enabled or not.
   */
  held?: boolean;
  /** Unusable as found (in use from a crash, bad fields): kept verbatim, only removable. */
  unusable?: string;
}

const DEFAULT_CACHE_CLUSTERS = 16;
const DEFAULT_MAX_PENDING = 4096;

export class PersistentBitmaps {
  private readonly bitmaps: Bitmap[];
  private readonly pending = new RangeSet();
  /** Data clusters read for extents(), by host offset (insertion order = age). */
  private readonly cache = new Map<number, Uint8Array>();
  /** Clusters allocated since the last directory write: nothing on disk references them. */
  private readonly fresh = new Set<number>();
  /** Ranges to free once a new directory is on disk: what only the old one references. */
  private deferredFrees: Array<[number, number]> = [];
  private directory: BitmapsExtension | undefined;
  private tracking = false;
  private readonly cacheClusters: number;
  private readonly maxPending: number;

  private constructor(
    private readonly host: BitmapReadHost,
    entries: BitmapEntry[],
    directory: BitmapsExtension | undefined,
    limits: BitmapLimits,
  ) {
    this.directory = directory;
    this.cacheClusters = Math.max(1, limits.cacheClusters ?? DEFAULT_CACHE_CLUSTERS);
    this.maxPending = Math.max(1, limits.maxPendingRanges ?? DEFAULT_MAX_PENDING);
    const geometry = { clusterSize: host.clusterSize, size: host.size, fileSize: host.fileSize() };
    this.bitmaps = entries.map((entry) => ({ entry, tableDirty: false, tracked: false, unusable: unusableReason(entry, geometry) }));
  }

  /**
   * The bitmaps an image's header describes. `valid` is the autoclear bit: when a program that
   * does not know bitmaps cleared it, they are stale and, as in QEMU, ignored (the writer then
   * drops the extension).
   */
  static async load(host: BitmapReadHost, ext: BitmapsExtension | undefined, valid: boolean, limits: BitmapLimits = {}): Promise<PersistentBitmaps> {
    if (!ext || !valid) return new PersistentBitmaps(host, [], undefined, limits);
    const { nbBitmaps, directorySize, directoryOffset } = ext;
    if (nbBitmaps === 0) throw corrupt('bitmaps extension with zero bitmaps');
    if (nbBitmaps > MAX_BITMAPS) throw corrupt(`bitmaps extension: ${nbBitmaps} bitmaps exceed the maximum of ${MAX_BITMAPS}`);
    if (directoryOffset % host.clusterSize !== 0) throw corrupt(`bitmap directory offset 0x${directoryOffset.toString(16)} is not cluster aligned`);
    if (directorySize > MAX_DIRECTORY_SIZE || directorySize < 24 * nbBitmaps) throw corrupt(`bitmap directory size ${directorySize} is invalid for ${nbBitmaps} bitmaps`);
    if (directoryOffset + directorySize > host.fileSize()) throw corrupt('bitmap directory lies past the end of the image');
    const dir = new Uint8Array(directorySize);
    await host.store.read(directoryOffset, dir);
    return new PersistentBitmaps(host, decodeDirectory(dir, nbBitmaps), ext, limits);
  }

  /**
   * Why QEMU would refuse to open this image for its bitmap directory, in QEMU's words with ours
   * in brackets, or undefined (`OpenOptions.refuseMalformedBitmaps`). QEMU takes the entries in
   * order, refuses any extra data (even data marked compatible), then applies its entry rules,
   * which do not look at the file's length.
   */
  refusalAtOpen(): string | undefined {
    for (const { entry } of this.bitmaps) {
      if (entry.extraData.length > 0) return `Bitmap extra data is not supported (bitmap '${entry.name}')`;
      // QEMU 7.2 counts the spec's extra_data_compatible flag (bit 2) among its reserved flags,
      // which fail the open (iotest 242), though a bitmap with it is otherwise well formed.
      const why = malformedReason(entry, this.host.clusterSize, Infinity) ?? (entry.flags & FLAG_EXTRA_DATA_COMPATIBLE ? 'flag extra_data_compatible, reserved in QEMU 7.2' : undefined);
      if (why) return `Bitmap '${entry.name}' doesn't satisfy the constraints (${why})`;
    }
    return undefined;
  }

  list(): BitmapInfo[] {
    return this.bitmaps.map((b) => {
      const info: BitmapInfo = {
        name: b.entry.name,
        granularity: 2 ** b.entry.granularityBits,
        inUse: (this.flagsOf(b) & FLAG_IN_USE) !== 0,
        auto: (b.entry.flags & FLAG_AUTO) !== 0,
      };
      if (b.unusable) info.unusable = b.unusable;
      return info;
    });
  }

  private find(name: string): Bitmap {
    const b = this.bitmaps.find((x) => x.entry.name === name);
    if (!b) throw new QcowError('QCOW_INVALID_ARGUMENT', `Dirty bitmap '${name}' not found`);
    return b;
  }

  private usable(name: string): Bitmap {
    const b = this.find(name);
    if (b.unusable) throw unsupported(`Bitmap '${name}' is inconsistent and cannot be used: ${b.unusable}`);
    return b;
  }

  /** The flags as they go to disk: in_use while tracked or held, or as found when unusable. */
  private flagsOf(b: Bitmap): number {
    const base = b.entry.flags & ~FLAG_IN_USE;
    return b.tracked || b.held === true || (b.entry.flags & FLAG_IN_USE) !== 0 ? base | FLAG_IN_USE : base;
  }

  // --- reading -----------------------------------------------------------------------------------

  private async table(b: Bitmap): Promise<Float64Array> {
    if (!b.table) {
      const buf = new Uint8Array(b.entry.tableSize * 8);
      await this.host.store.read(b.entry.tableOffset, buf);
      b.table = decodeTable(buf, this.host.clusterSize, this.host.fileSize(), b.entry.name);
    }
    return b.table;
  }

  private async readCluster(offset: number): Promise<Uint8Array> {
    const hit = this.cache.get(offset);
    if (hit) {
      this.cache.delete(offset);
      this.cache.set(offset, hit);
      return hit;
    }
    const buf = new Uint8Array(this.host.clusterSize);
    await this.host.store.read(offset, buf);
    this.remember(offset, buf);
    return buf;
  }

  private remember(offset: number, buf: Uint8Array): void {
    this.cache.set(offset, buf);
    while (this.cache.size > this.cacheClusters) this.cache.delete(this.cache.keys().next().value!);
  }

  /**
   * The dirty and clean extents of bitmap `name` over [offset, offset + length) of the disk,
   * merged, each a multiple of the granularity except at the end of the disk. Writes recorded
   * but not yet applied are included. Held whole: for a bounded range (an NBD request); use
   * runs() over a whole disk.
   */
  async extents(name: string, offset: number, length: number): Promise<DirtyExtent[]> {
    const out: DirtyExtent[] = [];
    for await (const e of this.runs(name, offset, length)) out.push(e);
    return out;
  }

  /**
   * extents(), one extent at a time: memory stays one data cluster and one pending extent
   * whatever the disk size and however fragmented the bitmap (4 TiB at 64 KiB granularity is 32
   * million bits, up to 32 million runs). Writes recorded while the runs are read are in the
   * runs not yet reached only if applied by then; the caller holding the image (backup) writes
   * nothing meanwhile.
   */
  async *runs(name: string, offset: number, length: number): AsyncGenerator<DirtyExtent> {
    const b = this.usable(name);
    // Recorded writes first; under the writer's lock, since applying them allocates. (Edits
    // that call this under the lock have applied them already, so the lock is not taken twice.)
    if (b.tracked && this.pending.count > 0) await this.writeHost().exclusive(() => this.applyPending());
    const end = Math.min(this.host.size, offset + length);
    // The extent being grown; yielded once the next run differs or does not touch it.
    let last: DirtyExtent | undefined;
    const table = await this.table(b);
    const gran = 2 ** b.entry.granularityBits;
    const perCluster = this.host.clusterSize * 8 * gran;
    for (let pos = offset; pos < end; ) {
      const ti = Math.floor(pos / perCluster);
      const clusterStart = ti * perCluster;
      const clusterEnd = Math.min(end, clusterStart + perCluster);
      const v = table[ti] ?? ALL_ZERO;
      const runs: Iterable<[number, number, boolean]> =
        v === ALL_ZERO || v === ALL_ONE
          ? [[pos, clusterEnd, v === ALL_ONE]]
          : (function* (data: Uint8Array) {
              const from = Math.floor((pos - clusterStart) / gran);
              const to = Math.ceil((clusterEnd - clusterStart) / gran);
              for (const [s, e, dirty] of bitRuns(data, from, to)) yield [clusterStart + s * gran, clusterStart + e * gran, dirty] as [number, number, boolean];
            })(await this.readCluster(v));
      for (const [runStart, runEnd, dirty] of runs) {
        const s = Math.max(runStart, offset);
        const e = Math.min(runEnd, end);
        if (e <= s) continue;
        if (last && last.dirty === dirty && last.offset + last.length === s) last.length += e - s;
        else {
          if (last) yield last;
          last = { offset: s, length: e - s, dirty };
        }
      }
      pos = clusterEnd;
    }
    if (last) yield last;
  }

  // --- recording writes --------------------------------------------------------------------------

  private writeHost(): BitmapWriteHost {
    const h = this.host as Partial<BitmapWriteHost>;
    if (!h.alloc) throw new QcowError('QCOW_READ_ONLY', 'image is opened read-only');
    return this.host as BitmapWriteHost;
  }

  /**
   * Called when the image is opened for writing: every enabled bitmap starts recording writes and
   * is flagged in_use on disk before the first write can happen. As QEMU 7.2 loads every bitmap
   * of a writable image, a disabled one is flagged in_use too (held, stored again at close), so a
   * session that dies leaves all of them inconsistent. A bitmap we cannot use (bad fields) is
   * flagged in_use for good, so nobody trusts it after our writes.
   */
  async startTracking(): Promise<void> {
    this.tracking = true;
    let changed = false;
    for (const b of this.bitmaps) {
      if (b.entry.flags & FLAG_IN_USE) continue;
      if (b.unusable) {
        b.entry.flags |= FLAG_IN_USE;
        b.unusable = unusableReason(b.entry, this.geometry());
      } else if (b.entry.flags & FLAG_AUTO) b.tracked = true;
      else b.held = true;
      changed = true;
    }
    if (changed) await this.flagInPlace();
  }

  /**
   * Rewrite the directory where it is, for a change of flags only (the in_use marks of a session
   * that opens the image for writing), as QEMU marks them: the directory's size does not change,
   * nothing is allocated. Anything else goes through writeDirectory.
   */
  private async flagInPlace(): Promise<void> {
    const dir = encodeDirectory(this.bitmaps.map((b) => ({ ...b.entry, flags: this.flagsOf(b) })));
    const at = this.directory;
    if (!at || dir.length !== at.directorySize || this.bitmaps.some((b) => b.tableDirty)) return this.writeDirectory();
    const host = this.writeHost();
    await host.store.write(at.directoryOffset, dir);
    await host.store.flush();
  }

  get tracks(): boolean {
    return this.bitmaps.some((b) => b.tracked);
  }

  /**
   * Record a guest write, zero write or discard of [offset, offset + length). Synchronous (no
   * promise) unless the pending ranges are over budget and must be applied: the write path
   * calls this per request and should not pay a tick for it.
   */
  /**
   * mark() when it needs no I/O: false, with nothing recorded, when the pending ranges would be
   * over budget and must be applied first (the caller then takes the lock and calls mark()).
   */
  markNow(offset: number, length: number): boolean {
    // An image without bitmaps (most) answers before `tracks` and its callback: this runs per request.
    if (this.bitmaps.length === 0 || !this.tracking || length <= 0 || !this.tracks) return true;
    // An added range merges or makes one more: within the budget either way.
    if (this.pending.count + 1 > this.maxPending) return false;
    this.pending.add(offset, offset + length);
    return true;
  }

  mark(offset: number, length: number): Promise<void> | undefined {
    if (!this.tracking || length <= 0 || !this.tracks) return undefined;
    this.pending.add(offset, offset + length);
    return this.pending.count > this.maxPending ? this.applyPending() : undefined;
  }

  /** Apply recorded writes to the clusters of every tracked bitmap (not yet to the directory). */
  private async applyPending(): Promise<void> {
    const ranges = this.pending.take();
    if (ranges.length === 0) return;
    for (const b of this.bitmaps) if (b.tracked) await this.setRanges(b, ranges);
  }

  /** Set the bits covering the guest ranges (sorted, disjoint) in bitmap b. */
  private async setRanges(b: Bitmap, ranges: Array<[number, number]>): Promise<void> {
    const host = this.writeHost();
    const cs = host.clusterSize;
    const table = await this.table(b);
    const gran = 2 ** b.entry.granularityBits;
    const bitsPerCluster = cs * 8;
    const totalBits = Math.ceil(host.size / gran);
    let ti = -1;
    let buf: Uint8Array | undefined;
    let changed = false;
    const finish = async () => {
      if (ti < 0 || !buf || !changed) return;
      await this.storeCluster(b, table, ti, buf);
    };
    for (const [s, e] of ranges) {
      let from = Math.floor(s / gran);
      const to = Math.min(totalBits, Math.ceil(e / gran));
      while (from < to) {
        const t = Math.floor(from / bitsPerCluster);
        if (t !== ti) {
          await finish();
          ti = t;
          changed = false;
          const v = table[t]!;
          buf = v === ALL_ONE ? undefined : v === ALL_ZERO ? new Uint8Array(cs) : (await this.readCluster(v)).slice();
        }
        const stop = Math.min(to, (t + 1) * bitsPerCluster);
        if (buf) {
          const before = changed || !allSet(buf, from - t * bitsPerCluster, stop - t * bitsPerCluster);
          if (before) {
            setBits(buf, from - t * bitsPerCluster, stop - t * bitsPerCluster);
            changed = true;
          }
        }
        from = stop;
      }
    }
    await finish();
  }

  /** New contents for data cluster `ti` of b: in place when fresh, else to a new cluster. */
  private async storeCluster(b: Bitmap, table: Float64Array, ti: number, buf: Uint8Array): Promise<void> {
    const host = this.writeHost();
    const old = table[ti]!;
    let at = old;
    if (!this.fresh.has(old)) {
      at = await host.alloc(1);
      this.fresh.add(at);
      if (old > ALL_ONE) this.deferredFrees.push([old, host.clusterSize]);
      table[ti] = at;
      b.tableDirty = true;
    }
    await host.store.write(at, buf);
    this.cache.delete(old);
    this.remember(at, buf);
  }

  /**
   * Store every tracked bitmap and clear its in_use flag (close, and before edits that need a
   * consistent image). `keepTracking`: stay flagged and recording (an edit in mid-session).
   */
  async store(keepTracking = false): Promise<void> {
    await this.applyPending();
    const tracked = this.bitmaps.filter((b) => b.tracked || b.held === true);
    if (!keepTracking) for (const b of tracked) b.tracked = b.held = false;
    if (tracked.length > 0 || this.bitmaps.some((b) => b.tableDirty)) await this.writeDirectory();
    if (!keepTracking) this.tracking = false;
  }

  // --- directory write-back ----------------------------------------------------------------------

  private geometry() {
    return { clusterSize: this.host.clusterSize, size: this.host.size, fileSize: this.host.fileSize() };
  }

  /**
   * Write the tables and a new directory, point the header at it, then free the old. As QEMU
   * stores bitmaps (at close, and so after each `qemu-img bitmap` edit), every usable bitmap gets
   * a new table, in directory order, before the directory; tables and directory are written as
   * long as they are, not padded to whole clusters (the file may end inside the last cluster, as
   * QEMU's does: what measures the file, such as `measure -f raw` over it, then agrees).
   */
  private async writeDirectory(): Promise<void> {
    const host = this.writeHost();
    const cs = host.clusterSize;
    for (const b of this.bitmaps) {
      if (b.unusable) continue;
      await this.table(b);
      b.tableDirty = true;
    }
    for (const b of this.bitmaps) {
      if (!b.tableDirty || !b.table) continue;
      const bytes = encodeTable(b.table);
      const at = await host.alloc(Math.ceil(bytes.length / cs));
      await host.store.write(at, bytes);
      if (b.entry.tableOffset !== 0) this.deferredFrees.push([b.entry.tableOffset, alignUp(b.entry.tableSize * 8, cs)]);
      b.entry.tableOffset = at;
      b.entry.tableSize = b.table.length;
      b.tableDirty = false;
    }
    const old = this.directory;
    let ext: BitmapsExtension | undefined;
    if (this.bitmaps.length > 0) {
      const dir = encodeDirectory(this.bitmaps.map((b) => ({ ...b.entry, flags: this.flagsOf(b) })));
      const at = await host.alloc(Math.ceil(dir.length / cs));
      await host.store.write(at, dir);
      ext = { nbBitmaps: this.bitmaps.length, directorySize: dir.length, directoryOffset: at };
    }
    await host.commit();
    await host.setExtension(ext);
    this.directory = ext;
    if (old) host.free(old.directoryOffset, alignUp(old.directorySize, cs));
    for (const [off, len] of this.deferredFrees) host.free(off, len);
    this.deferredFrees = [];
    this.fresh.clear();
  }

  // --- edits (qemu-img bitmap) -------------------------------------------------------------------

  /** Add an empty bitmap. `granularity` defaults as QEMU's: the cluster size within 4k..64k. */
  async add(name: string, options: { granularity?: number; disabled?: boolean } = {}): Promise<void> {
    const host = this.writeHost();
    if (!host.canStore) throw unsupported('Cannot store dirty bitmaps in qcow2 v2 files');
    const bytes = encodeUtf8(name).length;
    if (bytes === 0 || bytes > MAX_NAME_SIZE) throw invalidArgument(`bitmap name must be 1 to ${MAX_NAME_SIZE} bytes`);
    if (this.bitmaps.some((b) => b.entry.name === name)) throw invalidArgument(`Bitmap already exists: ${name}`);
    if (this.bitmaps.length >= MAX_BITMAPS) throw unsupported(`an image holds at most ${MAX_BITMAPS} bitmaps`);
    const granularity = options.granularity ?? Math.min(65536, Math.max(4096, host.clusterSize));
    const bits = Math.log2(granularity);
    if (!Number.isInteger(bits) || bits < MIN_GRANULARITY_BITS || bits > MAX_GRANULARITY_BITS) {
      throw invalidArgument(`Granularity must be a power of 2 between ${2 ** MIN_GRANULARITY_BITS} and ${2 ** MAX_GRANULARITY_BITS}`);
    }
    const tableSize = Math.max(1, tableSizeFor(host.size, bits, host.clusterSize));
    const entry: BitmapEntry = { tableOffset: 0, tableSize, flags: options.disabled ? 0 : FLAG_AUTO, type: TYPE_DIRTY_TRACKING, granularityBits: bits, name, extraData: new Uint8Array(0) };
    // A new enabled bitmap records writes from now on if this session records them.
    // Stored with the others when the image closes (store()), as QEMU stores a new bitmap.
    this.bitmaps.push({ entry, table: new Float64Array(tableSize), tableDirty: true, tracked: this.tracking && !options.disabled, held: this.tracking && options.disabled === true });
  }

  /** Remove a bitmap, usable or not (the only way out of a broken one). */
  async remove(name: string): Promise<void> {
    const b = this.find(name);
    if (b.tracked) await this.applyPending();
    await this.freeBitmap(b);
    this.bitmaps.splice(this.bitmaps.indexOf(b), 1);
    await this.writeDirectory();
  }

  /**
   * Remove every bitmap with one directory write, and the extension with them: what a
   * downgrade to compat=0.10 needs, since v2 images cannot hold bitmaps.
   */
  async removeAll(): Promise<void> {
    if (this.bitmaps.length === 0) return;
    this.pending.take();
    for (const b of this.bitmaps) await this.freeBitmap(b);
    this.bitmaps.length = 0;
    this.tracking = false;
    await this.writeDirectory();
  }

  /** Queue the frees of what bitmap b alone references (applied at the next directory write). */
  private async freeBitmap(b: Bitmap): Promise<void> {
    const cs = this.writeHost().clusterSize;
    // A bitmap left in use by a crash still has a sound table: free what it references. A table
    // that is itself broken is not followed (its clusters leak; check -r all reclaims them), so
    // a hostile table can never make us drop references that other structures hold.
    const sound = b.entry.tableOffset !== 0 && (!b.unusable || !unusableReason({ ...b.entry, flags: b.entry.flags & ~FLAG_IN_USE }, { ...this.geometry(), size: 0 }));
    if (sound) {
      const table = await this.table(b).catch(() => undefined);
      if (table) {
        for (const off of dataClusters(table)) this.deferredFrees.push([off, cs]);
        this.deferredFrees.push([b.entry.tableOffset, alignUp(b.entry.tableSize * 8, cs)]);
      }
    }
  }

  async clear(name: string): Promise<void> {
    const host = this.writeHost();
    const b = this.usable(name);
    if (b.tracked) await this.applyPending();
    const table = await this.table(b);
    for (const off of dataClusters(table)) this.deferredFrees.push([off, host.clusterSize]);
    b.table = new Float64Array(table.length);
    b.tableDirty = true;
    await this.writeDirectory();
  }

  async enable(name: string): Promise<void> {
    const b = this.usable(name);
    b.entry.flags |= FLAG_AUTO;
    if (this.tracking) {
      b.tracked = true;
      b.held = false;
    }
    await this.writeDirectory();
  }

  async disable(name: string): Promise<void> {
    const b = this.usable(name);
    if (b.tracked) await this.applyPending();
    b.entry.flags &= ~FLAG_AUTO;
    b.held = b.tracked || b.held === true;
    b.tracked = false;
    await this.writeDirectory();
  }

  /**
   * Refuse a resize QEMU refuses: it resizes bitmaps only when every one is usable. Call before
   * changing the size.
   */
  checkResize(): void {
    const bad = this.bitmaps.find((b) => b.unusable);
    if (bad) throw unsupported(`Bitmap '${bad.entry.name}' is inconsistent and cannot be used: cannot resize the image (remove the bitmap first)`);
  }

  /**
   * Follow a resize that has happened (host.size is the new size): tables grow with clean
   * entries or lose the ones past the end, and bits past the new end are cleared, as QEMU
   * truncates its in-memory bitmaps. Nothing is marked dirty.
   */
  async resized(oldSize: number): Promise<void> {
    if (this.bitmaps.length === 0) return;
    const host = this.writeHost();
    const cs = host.clusterSize;
    await this.applyPending();
    for (const b of this.bitmaps) {
      const table = await this.table(b);
      const n = Math.max(1, tableSizeFor(host.size, b.entry.granularityBits, cs));
      const next = new Float64Array(n);
      next.set(table.subarray(0, n));
      for (let i = n; i < table.length; i++) if (table[i]! > ALL_ONE) this.deferredFrees.push([table[i]!, cs]);
      b.table = next;
      b.tableDirty = true;
      if (host.size < oldSize) await this.clearTail(b);
    }
    await this.writeDirectory();
  }

  /** Clear the bits of b's last data cluster that lie past the end of the disk. */
  private async clearTail(b: Bitmap): Promise<void> {
    const cs = this.host.clusterSize;
    const table = b.table!;
    const bits = Math.ceil(this.host.size / 2 ** b.entry.granularityBits);
    const ti = Math.floor(bits / (cs * 8));
    if (ti >= table.length || bits % (cs * 8) === 0) return;
    const v = table[ti]!;
    if (v === ALL_ZERO) return;
    const buf = v === ALL_ONE ? new Uint8Array(cs).fill(0xff) : (await this.readCluster(v)).slice();
    const from = bits % (cs * 8);
    for (let k = from; k < cs * 8; k++) buf[k >> 3]! &= ~(1 << (k & 7));
    await this.storeCluster(b, table, ti, buf);
  }

  /**
   * dest |= source. The source may be a bitmap of another image of the same size (`from`); it is
   * read one data cluster at a time, so memory stays bounded whatever its size.
   */
  async merge(dest: string, source: string, from: PersistentBitmaps = this): Promise<void> {
    const host = this.writeHost();
    const d = this.usable(dest);
    from.usable(source);
    if (from.host.size !== host.size) throw invalidArgument(`Bitmaps are incompatible and can't be merged (sizes ${from.host.size} and ${host.size})`);
    if (this.tracks) await this.applyPending();
    const src = from.find(source);
    const window = from.host.clusterSize * 8 * 2 ** src.entry.granularityBits;
    for (let off = 0; off < host.size; off += window) {
      const ranges = (await from.extents(source, off, window)).filter((e) => e.dirty).map((e): [number, number] => [e.offset, e.offset + e.length]);
      if (ranges.length > 0) await this.setRanges(d, ranges);
    }
    await this.writeDirectory();
  }
}
