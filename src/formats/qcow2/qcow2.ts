/**
 * The QCOW2 block device (v2 and v3): opening (header, features, L1, snapshots, data file,
 * encryption), reading through L1/L2 with a bounded L2 cache, and allocation status.
 *
 * Reading is split so the writer can reuse it:
 *   - `mapRuns(offset, length)`: guest range -> runs of one subcluster kind each (`GuestRun`),
 *     contiguous host ranges already merged, so each `normal` run is one store read.
 *   - `readRun(run, into)`: fills `into` with the run's guest bytes (data, zeros, backing or a
 *     decompressed cluster).
 *   - `l2TableFor(guestOffset)`: the cached L2 table (a `CachedTable` from l2-cache.ts, with its
 *     dirty flag) or null when the L1 entry is empty.
 * Writes go through `writer` (write.ts), attached when the image is opened read-write.
 */
import type { BlockExtent, ImageDescription, OpenOptions, PlacedRange, PlainExtent, WriteOptions, ZeroOptions } from '../../core/block-device.js';
import { DeviceBase } from '../../core/device-base.js';
import { QcowError, corrupt, unsupported, withFile } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import { firstNonZero } from '../../core/bytes.js';
import { COMPRESSION_ZSTD, type Qcow2Header } from './header.js';
import { readHeader } from './read-header.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, hasFeature } from './features.js';
import { MAX_L1_BYTES, l1EntriesFor, qcow2Geometry, type Qcow2Geometry } from './layout.js';
import { l1EntryEmpty, l1TableOffset } from './l1-entry.js';
import { contiguousEntries, decodeL2Entry, readL2Entry, subclusterKind, type ClusterDescriptor, type L2Context, type SubclusterKind } from './l2-entry.js';
import { TableCache, type CachedTable } from './l2-cache.js';
import { findSnapshot, readSnapshotTable, type Qcow2Snapshot } from './snapshot-table.js';
import { decompressCluster } from './compressed.js';
// Type only: the cipher code (LUKS, AES) loads when an encrypted image is opened (start-up time).
import type { Qcow2Encryption } from './encryption.js';
import { Qcow2Writer } from './write.js';
import type { BitmapLimits, PersistentBitmaps } from './bitmaps/persistent.js';
import { detectMetadataPreallocation, holeRuns } from './prealloc.js';

/** L2 slice size of read-only opens (see Qcow2Device.slice). */
export const L2_SLICE_BYTES = 4096;

/** Default L2 cache budget: 32 MiB of tables maps 128 GiB with 64 KiB clusters. */
export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

/** Compressed clusters further apart than this in the file are read separately. */
const COMPRESSED_GAP_MAX = 4096;
/** Largest host span read at once for a group of compressed clusters. */
const COMPRESSED_GROUP_MAX = 4 * 1024 * 1024;

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

export interface Qcow2OpenState {
  store: ByteStore;
  header: Qcow2Header;
  fileSize: number;
  readOnly: boolean;
  options: OpenOptions;
}

/** Every byte of L2 entry `index` is zero: an unallocated cluster (all subclusters unallocated). */
export class Qcow2Device extends DeviceBase {
  readonly format = 'qcow2';
  readonly clusterSize: number;
  header: Qcow2Header;
  readonly geometry: Qcow2Geometry;
  /** Current length of the image file; the writer keeps it up to date as it allocates. */
  fileSize: number;
  /** The L1 table in use (active, or the opened snapshot's), as raw big-endian bytes. */
  l1: Uint8Array;
  l1Entries: number;
  readonly l2Cache: TableCache;
  /**
   * The unit the L2 cache holds: a slice of a table. Read-only opens cache slices of at most
   * L2_SLICE_BYTES (a 2 MiB-cluster image then costs 4 KiB, not 2 MiB, per table touched, and a
   * cold random read loads 4 KiB of metadata); writable opens cache whole tables (slice = table),
   * which the write path relies on.
   */
  readonly slice: { entries: number; bytes: number; coverage: number };
  /** Metadata cache budget: all of it for L2 tables, a quarter more for refcount blocks. */
  readonly cacheBytes: number;
  readonly l2Context: L2Context;
  /** A descriptor reused by loops that decode an entry per cluster and keep none of them. */
  private readonly scratchEntry = readL2Entry(new Uint8Array(16), 0, { clusterBits: 9, extendedL2: false, externalDataFile: false });
  /** Where guest data lives: the image itself, or the external data file. */
  dataStore: ByteStore;
  snapshots: Qcow2Snapshot[] = [];
  /** The snapshot opened with OpenOptions.snapshot, if any (then the device is read-only). */
  openedSnapshot: Qcow2Snapshot | undefined;
  encryption: Qcow2Encryption | null = null;
  /** The last decompressed cluster, by descriptor host offset: small sequential reads hit it. */
  lastCompressed: { hostOffset: number; data: Uint8Array } | null = null;
  /** The write path (write.ts), present when the image is open read-write. */
  writer: Qcow2Writer | null = null;
  /** Memory limits of the persistent bitmaps (OpenOptions.bitmapLimits). */
  readonly bitmapLimits: BitmapLimits;
  /** The bitmaps of a read-only image, loaded on first use (see persistentBitmaps). */
  private readBitmaps: Promise<PersistentBitmaps> | undefined;
  /** Decided on the first blockStatus, as qemu does (see prealloc.ts). */
  private metadataPreallocation: Promise<boolean> | undefined;

  protected constructor(s: Qcow2OpenState) {
    super(s.store, s.header.size, s.readOnly);
    this.header = s.header;
    this.fileSize = s.fileSize;
    this.geometry = qcow2Geometry(s.header.clusterBits, hasFeature(s.header.incompatibleFeatures, INCOMPAT_EXTL2));
    this.clusterSize = this.geometry.clusterSize;
    this.l1 = new Uint8Array(0);
    this.l1Entries = 0;
    this.dataStore = s.store;
    this.l2Context = {
      clusterBits: s.header.clusterBits,
      extendedL2: this.geometry.extendedL2,
      externalDataFile: hasFeature(s.header.incompatibleFeatures, INCOMPAT_DATA_FILE),
    };
    this.cacheBytes = s.options.cacheBytes ?? DEFAULT_L2_CACHE_BYTES;
    this.bitmapLimits = s.options.bitmapLimits ?? {};
    const sliceBytes = s.readOnly ? Math.min(this.clusterSize, L2_SLICE_BYTES) : this.clusterSize;
    const sliceEntries = sliceBytes / this.geometry.l2EntryBytes;
    this.slice = { entries: sliceEntries, bytes: sliceBytes, coverage: sliceEntries * this.clusterSize };
    this.l2Cache = new TableCache({
      tableBytes: sliceBytes,
      budgetBytes: this.cacheBytes,
      load: (off, into) => this.loadTable(off, into, 'L2 table'),
      writeBack: (off, data) => this.writeTable(off, data),
    });
  }

  static async open(store: ByteStore, options: OpenOptions = {}): Promise<Qcow2Device> {
    const { header, fileSize } = await readHeader(store);
    const readOnly = (options.readOnly ?? store.readOnly) || options.snapshot !== undefined;
    if (hasFeature(header.incompatibleFeatures, INCOMPAT_CORRUPT) && !readOnly) {
      throw corrupt('Image is corrupt; cannot be opened read/write');
    }
    const dev = new Qcow2Device({ store, header, fileSize, readOnly, options });
    try {
      await dev.init(options);
      if (!readOnly) dev.writer = await Qcow2Writer.attach(dev);
    } catch (e) {
      await dev.releaseOpened();
      throw e;
    }
    return dev;
  }

  /** Everything after the header: validation, L1, snapshots, data file, encryption, backing. */
  protected async init(options: OpenOptions): Promise<void> {
    const h = this.header;
    const g = this.geometry;
    if (g.extendedL2 && h.clusterBits < 14) throw corrupt('extended L2 entries need a cluster size of at least 16 KiB');
    this.checkAligned(h.l1TableOffset, 'L1 table offset');
    this.checkAligned(h.refcountTableOffset, 'refcount table offset');

    if (options.snapshot !== undefined || h.nbSnapshots > 0) {
      this.snapshots = await readSnapshotTable(this.store, h.nbSnapshots, h.snapshotsOffset, this.fileSize);
    }
    if (options.snapshot !== undefined) {
      const snap = findSnapshot(this.snapshots, options.snapshot);
      this.openedSnapshot = snap;
      if (snap.diskSize !== undefined) this.size = snap.diskSize;
      this.l1 = await this.readL1(snap.l1TableOffset, snap.l1Size, `snapshot '${snap.name}' L1 table`);
      this.l1Entries = snap.l1Size;
    } else {
      this.l1 = await this.readL1(h.l1TableOffset, h.l1Size, 'L1 table');
      this.l1Entries = h.l1Size;
    }
    if (this.l1Entries < l1EntriesFor(this.size, g)) {
      throw corrupt(`L1 table is too small: ${this.l1Entries} entries for a ${this.size}-byte image`);
    }

    if (hasFeature(h.incompatibleFeatures, INCOMPAT_DATA_FILE)) {
      if (h.dataFile === undefined) throw unsupported("'data-file' is required for this image (it has no data file name)");
      if (!options.openFile) throw unsupported(`cannot open external data file '${h.dataFile}' (no file opener)`);
      this.dataStore = await options.openFile(h.dataFile, { readOnly: this.readOnly });
    }
    if (h.cryptMethod !== 0) {
      const { openEncryption } = await import('./encryption.js');
      this.encryption = await openEncryption(this.store, h, this.fileSize, options);
    }
    if (h.backingFile !== undefined && options.openBacking) {
      this.backing = await options.openBacking(h.backingFile, h.backingFormat);
    }
  }

  /** Close what init() opened, after it failed. */
  private async releaseOpened(): Promise<void> {
    if (this.dataStore !== this.store) await this.dataStore.close().catch(() => undefined);
    await this.backing?.close().catch(() => undefined);
  }

  private checkAligned(offset: number, what: string): void {
    if (offset % this.clusterSize !== 0) throw corrupt(`${what} 0x${offset.toString(16)} is not cluster aligned`);
  }

  /** An L1 table as raw bytes (at most qemu's 32 MiB), bounds-checked against the file. */
  private async readL1(offset: number, entries: number, what: string): Promise<Uint8Array> {
    const bytes = entries * 8;
    if (bytes > MAX_L1_BYTES) throw corrupt(`${what}: ${entries} entries is more than qemu's limit of ${MAX_L1_BYTES / 8}`);
    if (entries === 0) return new Uint8Array(0);
    this.checkAligned(offset, what);
    if (offset === 0 || offset + bytes > this.fileSize) {
      throw corrupt(`${what} [0x${offset.toString(16)}, +0x${bytes.toString(16)}) lies outside the file (${this.fileSize} bytes)`);
    }
    const l1 = new Uint8Array(bytes);
    await this.store.read(offset, l1);
    return l1;
  }

  private async loadTable(offset: number, into: Uint8Array, what: string): Promise<void> {
    if (offset + into.length > this.fileSize) {
      throw corrupt(`${what} at 0x${offset.toString(16)} lies beyond the end of the file (${this.fileSize} bytes)`);
    }
    await this.store.read(offset, into);
  }

  /** Write-back hook of the L2 cache; reading never dirties a table. */
  protected async writeTable(offset: number, data: Uint8Array): Promise<void> {
    // Refcounts first: an on-disk L2 entry must never reference a cluster with no count on disk.
    await this.writer?.beforeL2Write();
    await this.store.write(offset, data);
  }

  /** Whether L1 entry `i` names no L2 table (past the table, or host offset bits 9-55 all 0). */
  private l1EntryEmpty(i: number): boolean {
    return i >= this.l1Entries || l1EntryEmpty(this.l1, i);
  }

  /**
   * The L2 slice covering `guestOffset` (the whole table when the image is writable; its first
   * entry is that of the slice's first cluster), or null when the L1 entry is empty.
   */
  async l2TableFor(guestOffset: number): Promise<CachedTable | null> {
    const i = Math.floor(guestOffset / this.geometry.l2Coverage);
    if (i >= this.l1Entries) return null;
    const l2Offset = l1TableOffset(this.l1, i);
    if (l2Offset === 0) return null;
    if (l2Offset % this.clusterSize !== 0) throw corrupt(`L1 entry ${i}: L2 table offset 0x${l2Offset.toString(16)} is not cluster aligned`);
    return this.l2Cache.get(l2Offset + Math.floor((guestOffset % this.geometry.l2Coverage) / this.slice.coverage) * this.slice.bytes);
  }

  /** The runs of [offset, offset+length), in order, merged where kind and host offsets run on. */
  async mapRuns(offset: number, length: number): Promise<GuestRun[]> {
    const g = this.geometry;
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
          const scanTo = Math.min(this.l1.length, Math.ceil(end / g.l2Coverage) * 8);
          const next = Math.floor(firstNonZero(this.l1, Math.min((i + 1) * 8, scanTo), scanTo) / 8);
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
        const d = readL2Entry(table.data, index, this.l2Context);
        this.checkHostOffset(d, clusterStart);
        if (d.kind === 'compressed') {
          push({ offset: pos, length: clusterEnd - pos, kind: 'compressed', descriptor: d, clusterStart });
          pos = clusterEnd;
          continue;
        }
        if (d.kind === 'normal' && !g.extendedL2) {
          // The clusters that follow in the table and in the file (a fully allocated image is one
          // such run per table) in one step: their entries are this one plus k clusters, flags
          // alike, so they decode alike; only the last one's offset needs its bounds check.
          const runEnd = contiguousEntries(table.data, index, (tableEnd - clusterStart) / g.clusterSize, g.clusterSize);
          const last = clusterStart + (runEnd - index - 1) * g.clusterSize;
          if (runEnd - index > 1) this.checkHostOffset({ ...d, hostOffset: d.hostOffset + (last - clusterStart) }, last);
          const end = Math.min(tableEnd, last + g.clusterSize);
          push({ offset: pos, length: end - pos, kind: 'normal', hostOffset: d.hostOffset + (pos - clusterStart) });
          pos = end;
          continue;
        }
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

  /**
   * The index past the run of standard L2 entries that starts at `index` where each entry is the
   * previous one plus one cluster (the same flags, the next host cluster), at most `max` entries.
   */
  /** Data clusters must start inside their file (external data files may be shorter: reads past them are zeros). */
  private checkHostOffset(d: ClusterDescriptor, guest: number): void {
    if (d.kind === 'unallocated' || d.kind === 'zero-plain') return;
    if (this.dataStore !== this.store && d.kind !== 'compressed') return;
    if (d.hostOffset >= this.fileSize) {
      throw corrupt(`L2 entry for guest offset 0x${guest.toString(16)} points at 0x${d.hostOffset.toString(16)}, beyond the end of the file (${this.fileSize} bytes)`);
    }
  }

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    const host = this.contiguousHost(offset, into.length);
    if (host >= 0) {
      await this.dataStore.read(host, into);
      return;
    }
    const runs = await this.mapRuns(offset, into.length);
    const view = (r: GuestRun) => into.subarray(r.offset - offset, r.offset - offset + r.length);
    // Runs are independent; issue them together so the store can overlap them.
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < runs.length; ) {
      const group = this.compressedGroup(runs, i);
      if (group > 1) {
        jobs.push(this.readCompressedGroup(runs.slice(i, i + group), view));
        i += group;
      } else {
        jobs.push(this.readRun(runs[i]!, view(runs[i]!)));
        i++;
      }
    }
    await Promise.all(jobs);
  }

  /**
   * The common request, worked out synchronously: [offset, +length) inside one L2 table that is
   * cached, every cluster normal and the host clusters contiguous. Returns the host offset, or -1
   * when the general path (mapRuns) must decide. Saves the run objects and promise chain per
   * request that dominated small reads (about half of a 4 KiB read's CPU time).
   */
  private contiguousHost(offset: number, length: number): number {
    const g = this.geometry;
    if (this.encryption || g.extendedL2) return -1;
    const sc = this.slice.coverage;
    // One slice (and so one table) only.
    if (Math.floor(offset / sc) !== Math.floor((offset + length - 1) / sc)) return -1;
    const i = Math.floor(offset / g.l2Coverage);
    if (i >= this.l1Entries) return -1;
    const l2Offset = l1TableOffset(this.l1, i);
    const cs = this.clusterSize;
    // Empty, misaligned (the general path reports it) or not cached: the general path decides.
    if (l2Offset === 0 || l2Offset % cs !== 0) return -1;
    const table = this.l2Cache.peek(l2Offset + Math.floor((offset % g.l2Coverage) / sc) * this.slice.bytes);
    if (!table) return -1;
    let host = -1;
    const d = this.scratchEntry; // looked at within each step only
    for (let c = offset - (offset % cs); c < offset + length; c += cs) {
      decodeL2Entry(table.data, (c % sc) / cs, this.l2Context, d);
      if (d.kind !== 'normal') return -1;
      this.checkHostOffset(d, c);
      if (host < 0) host = d.hostOffset + (offset - c);
      else if (d.hostOffset !== host + (c - offset)) return -1;
    }
    return host;
  }

  /** Host bytes to read for a compressed cluster: its bound, clipped to the file. */
  private compressedSpan(d: ClusterDescriptor): number {
    return Math.min(d.compressedBound, this.fileSize - d.hostOffset);
  }

  /**
   * How many runs from `i` on are compressed clusters lying one after another in the file (as
   * a compressing writer leaves them): those are read with one store read instead of one each,
   * a few hundred bytes apiece for well-compressed data.
   */
  private compressedGroup(runs: GuestRun[], i: number): number {
    const first = runs[i]!;
    if (first.kind !== 'compressed') return 1;
    const start = first.descriptor!.hostOffset;
    let end = start + this.compressedSpan(first.descriptor!);
    let n = 1;
    for (let j = i + 1; j < runs.length; j++, n++) {
      const d = runs[j]!.descriptor;
      if (runs[j]!.kind !== 'compressed' || !d) break;
      // Next in the file (streams share sectors, so it may start inside the previous bound).
      if (d.hostOffset < start || d.hostOffset > end + COMPRESSED_GAP_MAX) break;
      const e = d.hostOffset + this.compressedSpan(d);
      if (e - start > COMPRESSED_GROUP_MAX) break;
      end = Math.max(end, e);
    }
    return n;
  }

  /** Compressed runs from compressedGroup(): one read of their host span, then each decompressed. */
  private async readCompressedGroup(runs: GuestRun[], view: (r: GuestRun) => Uint8Array): Promise<void> {
    let start = Infinity;
    let end = 0;
    for (const r of runs) {
      const d = r.descriptor!;
      const n = this.compressedSpan(d);
      if (n <= 0) throw corrupt(`compressed cluster at 0x${d.hostOffset.toString(16)} lies beyond the end of the file`);
      start = Math.min(start, d.hostOffset);
      end = Math.max(end, d.hostOffset + n);
    }
    const raw = new Uint8Array(end - start);
    await this.store.read(start, raw);
    const kind = this.header.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib';
    await Promise.all(
      runs.map(async (r) => {
        const d = r.descriptor!;
        const hit = this.lastCompressed;
        let data: Uint8Array;
        if (hit && hit.hostOffset === d.hostOffset) data = hit.data;
        else {
          const from = d.hostOffset - start;
          data = await decompressCluster(raw.subarray(from, from + this.compressedSpan(d)), this.clusterSize, kind, d.hostOffset);
          this.lastCompressed = { hostOffset: d.hostOffset, data };
        }
        const into = view(r);
        const at = r.offset - r.clusterStart!;
        into.set(data.subarray(at, at + into.length));
      }),
    );
  }

  /** Fill `into` (exactly run.length bytes) with the run's guest content. */
  async readRun(r: GuestRun, into: Uint8Array): Promise<void> {
    switch (r.kind) {
      case 'zero-plain':
      case 'zero-alloc':
        into.fill(0);
        return;
      case 'unallocated':
      case 'unallocated-alloc':
        await this.readBacking(r.offset, into);
        return;
      case 'compressed': {
        const data = await this.compressedCluster(r.descriptor!);
        const from = r.offset - r.clusterStart!;
        into.set(data.subarray(from, from + into.length));
        return;
      }
      case 'normal':
        await this.readData(r.offset, r.hostOffset!, into);
    }
  }

  /** Guest bytes stored at `hostOffset` in the data store, decrypted when the image is encrypted. */
  async readData(guestOffset: number, hostOffset: number, into: Uint8Array): Promise<void> {
    const enc = this.encryption;
    if (!enc) {
      await this.dataStore.read(hostOffset, into);
      return;
    }
    // Encryption works on whole 512-byte sectors; clusters and subclusters are sector aligned,
    // so widening the range to sectors stays inside the same (sub)cluster.
    const lead = guestOffset % 512;
    const total = Math.ceil((lead + into.length) / 512) * 512;
    const buf = new Uint8Array(total);
    await this.dataStore.read(hostOffset - lead, buf);
    const plain = await enc.cipher().decrypt(buf, (enc.ivFromHostSector ? hostOffset - lead : guestOffset - lead) / 512);
    into.set(plain.subarray(lead, lead + into.length));
  }

  /** One compressed cluster, decompressed (never encrypted, even in encrypted images). */
  async compressedCluster(d: ClusterDescriptor): Promise<Uint8Array> {
    const hit = this.lastCompressed;
    if (hit && hit.hostOffset === d.hostOffset) return hit.data;
    // The stored length is an upper bound that may run past EOF: read what exists.
    const n = Math.min(d.compressedBound, this.fileSize - d.hostOffset);
    if (n <= 0) throw corrupt(`compressed cluster at 0x${d.hostOffset.toString(16)} lies beyond the end of the file`);
    const raw = new Uint8Array(n);
    await this.store.read(d.hostOffset, raw);
    const data = await decompressCluster(raw, this.clusterSize, this.header.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib', d.hostOffset);
    this.lastCompressed = { hostOffset: d.hostOffset, data };
    return data;
  }

  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const runs = await this.mapRuns(offset, length);
    const external = this.dataStore !== this.store ? this.dataStore.name : undefined;
    // qemu reports no host offsets for encrypted images (the bytes there are not the guest's).
    const showOffsets = this.encryption === null;
    this.metadataPreallocation ??= external !== undefined ? Promise.resolve(false) : detectMetadataPreallocation(this.store, this.header, this.fileSize);
    const prealloc = await this.metadataPreallocation;
    const out: BlockExtent[] = [];
    for (const r of runs) {
      const e: BlockExtent = {
        offset: r.offset,
        length: r.length,
        allocated: r.kind === 'normal' || r.kind === 'compressed' || r.kind === 'zero-plain' || r.kind === 'zero-alloc',
        zero: r.kind === 'zero-plain' || r.kind === 'zero-alloc',
        data: r.kind === 'normal' || r.kind === 'compressed',
      };
      if (r.kind === 'compressed') e.compressed = true;
      if (r.hostOffset !== undefined && showOffsets) {
        e.hostOffset = r.hostOffset;
        if (external !== undefined) e.hostFile = external;
      }
      if (prealloc && r.kind === 'normal' && showOffsets) {
        // Like qemu: data in a metadata-preallocated image is also "zero" where the file has a hole.
        for (const h of await holeRuns(this.store, r.hostOffset!, r.length)) {
          out.push({ ...e, offset: r.offset + h.offset, length: h.length, zero: h.zero, hostOffset: r.hostOffset! + h.offset });
        }
        continue;
      }
      out.push(e);
    }
    return out;
  }

  /**
   * The image's persistent dirty bitmaps: the writer's (recording writes) when open read-write,
   * else read once from the directory. Stale bitmaps (autoclear bit cleared) are not listed.
   */
  async persistentBitmaps(): Promise<PersistentBitmaps> {
    if (this.writer) return this.writer.bitmaps;
    this.readBitmaps ??= (async () => {
      const { PersistentBitmaps } = await import('./bitmaps/persistent.js');
      const host = { store: this.store, clusterSize: this.clusterSize, size: this.size, fileSize: () => this.fileSize };
      return PersistentBitmaps.load(host, this.header.bitmaps, hasFeature(this.header.autoclearFeatures, AUTOCLEAR_BITMAPS), this.bitmapLimits).catch((e: unknown) => {
        throw withFile(e, this.filename);
      });
    })();
    return this.readBitmaps;
  }

  /** Change the bitmaps (qcow bitmap) with the image's metadata written back and its lock held. */
  async editBitmaps<T>(fn: (bitmaps: PersistentBitmaps) => Promise<T>): Promise<T> {
    return this.requireWriter().editBitmaps(fn);
  }

  async describe(): Promise<ImageDescription> {
    // Loaded when asked for (info, measure): it brings the bitmap directory reader with it.
    const { describeQcow2 } = await import('./describe.js');
    return describeQcow2(this);
  }

  /** Incompatible bit 0: refcounts may be stale (lazy refcounts and no clean close). */
  get dirty(): boolean {
    return hasFeature(this.header.incompatibleFeatures, INCOMPAT_DIRTY);
  }

  get dataFileRaw(): boolean {
    return hasFeature(this.header.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  }

  protected async doWrite(offset: number, data: Uint8Array, _options: WriteOptions): Promise<void> {
    await this.requireWriter().write(offset, data);
  }

  protected override async doWriteZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    await this.requireWriter().writeZeroes(offset, length, options);
  }

  protected override async doDiscard(offset: number, length: number): Promise<void> {
    await this.requireWriter().discard(offset, length);
  }

  /** Copy offload, source side: normal clusters of an unencrypted image are plain bytes of the data file. */
  async plainExtents(offset: number, length: number): Promise<PlainExtent[]> {
    this.checkRequest(offset, length);
    const out: PlainExtent[] = [];
    for (const r of await this.mapRuns(offset, length)) {
      const plain = r.kind === 'normal' && !this.encryption;
      const last = out[out.length - 1];
      if (plain && last?.store && last.hostOffset! + last.length === r.hostOffset) last.length += r.length;
      else if (!plain && last && !last.store) last.length += r.length;
      else out.push(plain ? { offset: r.offset, length: r.length, store: this.dataStore, hostOffset: r.hostOffset! } : { offset: r.offset, length: r.length });
    }
    return out;
  }

  /** Copy offload, target side (see Qcow2Writer.writePlaced). */
  async writePlaced(offset: number, length: number, put: (range: PlacedRange) => Promise<void>): Promise<void> {
    const writer = this.requireWriter();
    this.checkRequest(offset, length);
    if (length > 0) await writer.writePlaced(offset, length, put).catch(this.nameTheImage);
  }

  /**
   * Store whole clusters compressed: `offset` cluster aligned, `data` whole clusters, except that
   * the image's last cluster may be short. Checked here, before anything is compressed.
   */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    const writer = this.requireWriter();
    this.checkRequest(offset, data.length);
    if (data.length === 0) return;
    const cs = this.clusterSize;
    if (offset % cs !== 0) throw new QcowError('QCOW_INVALID_ARGUMENT', 'compressed writes must start at a cluster boundary');
    if (data.length % cs !== 0 && offset + data.length !== this.size) throw new QcowError('QCOW_INVALID_ARGUMENT', 'compressed writes must cover whole clusters');
    await writer.writeCompressed(offset, data);
  }

  async resize(size: number, options: { shrink?: boolean } = {}): Promise<void> {
    const writer = this.requireWriter();
    if (!Number.isSafeInteger(size) || size < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid size ${size}`);
    const old = this.size;
    await writer.resize(size, options.shrink ?? false);
    // Growing over a backing image that reaches past the old end: the new range reads as zeros,
    // not as the backing image's bytes there, as QEMU makes it (bdrv_co_truncate's zero write).
    // Opened without its backing image (qemu-img resize's way here), its length is unknown: zero.
    const backingReaches = this.backing ? this.backing.size > old : this.header.backingFile !== undefined;
    if (size > old && backingReaches) await this.writeZeroes(old, size - old);
  }

  async setBacking(name: string | null, format: string | null): Promise<void> {
    await this.requireWriter().setBacking(name, format);
  }

  async makeEmpty(): Promise<void> {
    await this.requireWriter().makeEmpty();
  }

  /**
   * The write path, for the operations that change the image (snapshots and amend too). A
   * read-only image throws DeviceBase's read-only error, the one every format gives.
   */
  requireWriter(): Qcow2Writer {
    this.checkWritable();
    // open() gives every image it opens writable a writer, or fails.
    return this.writer!;
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    if (this.writer) {
      await this.writer.flush();
      if (this.dataStore !== this.store) await this.dataStore.flush();
      return;
    }
    await this.l2Cache.flush();
    await this.store.flush();
    if (this.dataStore !== this.store) await this.dataStore.flush();
  }

  protected async doClose(): Promise<void> {
    try {
      if (this.writer) await this.writer.close();
      else if (!this.readOnly) await this.flush();
    } finally {
      this.l2Cache.clear();
      this.lastCompressed = null;
      if (this.dataStore !== this.store) await this.dataStore.close();
      await this.store.close();
    }
  }
}
