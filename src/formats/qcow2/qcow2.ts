/**
 * The QCOW2 block device (v2 and v3), on top of the modules that do the work:
 *   image.ts        the state and its one owner (header, geometry, stores, file size, snapshots);
 *   cluster-map.ts  L1 ownership, L2 lookup (through the metadata cache) and linking;
 *   alloc.ts        refcounts and allocation (refcount.ts is their codec);
 *   data-io.ts      guest data in and out of clusters (encrypted, compressed);
 *   write.ts        the write path: locking, in-flight writes, copy-on-write, write-back order;
 *   snapshot-write.ts, amend.ts, describe.ts, check.ts: operations over those.
 * This file opens an image (header, features, L1, snapshots, data file, encryption, backing),
 * answers reads and block status, passes writes to the writer (attached when the image is opened
 * read-write), and closes. Imports run one way: device -> writer -> cluster map -> allocator ->
 * metadata cache -> layouts.
 */
import type { AmendContext, AmendProgressCallback, BlockExtent, ImageDescription, OpenOptions, PlacedRange, PlainExtent, PlainRun, ResizeOptions, WriteOptions, ZeroOptions } from '../../core/block-device.js';
import { DeviceBase } from '../../core/device-base.js';
import { CorruptionEvent, ImageMarkedCorrupt, QcowError, corrupt, unsupported, withFile } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import { unopenedStore } from '../../storage/unopened.js';
import { isExactByteCount } from '../../core/bytes.js';
import type { Qcow2Header } from './header.js';
import { readHeader } from './read-header.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, AUTOCLEAR_BITMAPS, hasFeature } from './features.js';
import { MAX_REFCOUNT_TABLE_BYTES, l1EntriesFor, type Qcow2Geometry } from './layout.js';
import type { L2Context } from './l2-entry.js';
import type { TableCache } from './metadata-cache.js';
import { readsAsZero } from '../../core/reads-zero.js';
import { findSnapshot, readSnapshotTable, type Qcow2Snapshot } from './snapshot-table.js';
// Type only: the cipher code (LUKS, AES) loads when an encrypted image is opened (start-up time).
import type { Qcow2Encryption } from './encryption.js';
import { Qcow2Image } from './image.js';
import { ClusterMap, DEFAULT_L2_CACHE_BYTES } from './cluster-map.js';
import { DataIo } from './data-io.js';
// The writer (write.ts, and the allocator, bitmaps and emptying under it) is loaded when an image is
// opened for writing: a read-only open (info, map, check, compare, a convert's source) set up ~10
// modules it never ran, and their code was in every command's code cache.
import type { Qcow2Writer } from './write.js';
import type { BitmapLimits, PersistentBitmaps } from './bitmaps/persistent.js';
import { detectMetadataPreallocation, holeRuns } from './prealloc.js';

export { DEFAULT_L2_CACHE_BYTES, L2_SLICE_BYTES, type GuestRun } from './cluster-map.js';

export class Qcow2Device extends DeviceBase {
  readonly format = 'qcow2';
  /** writeCompressed takes any run of whole clusters (it compresses them together, places them in order). */
  readonly writeCompressedMaxClusters = Number.MAX_SAFE_INTEGER;
  readonly clusterSize: number;
  /** The image's state; only it changes what it holds (see image.ts). */
  readonly image: Qcow2Image;
  /** Where each guest cluster lives (see cluster-map.ts). */
  readonly map: ClusterMap;
  private readonly io: DataIo;
  /** The write path (write.ts), present when the image is open read-write. */
  private writePath: Qcow2Writer | null = null;
  /** Memory limits of the persistent bitmaps (OpenOptions.bitmapLimits). */
  readonly bitmapLimits: BitmapLimits;
  /** The bitmaps of a read-only image, loaded on first use (see persistentBitmaps). */
  private readBitmaps: Promise<PersistentBitmaps> | undefined;
  /** Decided on the first blockStatus, as qemu does (see prealloc.ts). */
  private metadataPreallocation: Promise<boolean> | undefined;
  /** What metadataPreallocation resolved to, once it has (plainRunNow needs it at once). */
  private metadataPreallocated: boolean | undefined;
  /** OpenOptions.onWarning: what QEMU would print about a failed step while the operation goes on. */
  readonly onWarning: ((message: string) => void) | undefined;

  protected constructor(store: ByteStore, header: Qcow2Header, fileSize: number, readOnly: boolean, options: OpenOptions) {
    super(store, header.size, readOnly);
    this.image = new Qcow2Image(store, header, fileSize, readOnly, this);
    this.clusterSize = this.image.clusterSize;
    this.map = new ClusterMap(this.image, options.cacheBytes ?? DEFAULT_L2_CACHE_BYTES, options.overlapCheck);
    this.io = new DataIo(this.image, this.map, (offset, into) => this.readBacking(offset, into));
    this.bitmapLimits = options.bitmapLimits ?? {};
    this.onWarning = options.onWarning;
    this.image.corruption.listener = options.onCorruption;
  }

  static async open(store: ByteStore, options: OpenOptions = {}): Promise<Qcow2Device> {
    const { header, fileSize } = await readHeader(store);
    const readOnly = (options.readOnly ?? store.readOnly) || options.snapshot !== undefined;
    if (hasFeature(header.incompatibleFeatures, INCOMPAT_CORRUPT) && !readOnly) {
      throw corrupt('the image is marked corrupt and cannot be opened read/write (it can be read; check -r all repairs it)', store.name);
    }
    const dev = new Qcow2Device(store, header, fileSize, readOnly, options);
    try {
      await dev.init(options);
      if (!readOnly) {
        const { Qcow2Writer } = await import('./write.js');
        dev.writePath = await Qcow2Writer.attach({
          image: dev.image,
          map: dev.map,
          io: dev.io,
          hasBacking: () => dev.backing !== null || dev.image.header.backingFile !== undefined,
          layerStatus: (offset, length) => dev.blockStatus(offset, length),
          // A backing file named but not opened may hold anything there.
          chainReadsZero: async (offset, length) => (dev.backing === null && dev.image.header.backingFile !== undefined ? length === 0 : readsAsZero(dev, offset, length)),
          bitmapLimits: dev.bitmapLimits,
          lazyRefcounts: options.lazyRefcounts,
          discardPassthrough: options.discardPassthrough,
          onRepair: options.onRepair,
          onWarning: options.onWarning,
        });
      }
    } catch (e) {
      await dev.releaseOpened();
      throw e;
    }
    return dev;
  }

  /** Everything after the header: validation, L1, snapshots, data file, encryption, backing. */
  protected async init(options: OpenOptions): Promise<void> {
    const img = this.image;
    const h = img.header;
    if (img.geometry.extendedL2 && h.clusterBits < 14) throw corrupt('extended L2 entries need a cluster size of at least 16 KiB');
    // QEMU's order: the refcount table's size, its offset, then the L1 table's.
    if (h.refcountTableClusters > MAX_REFCOUNT_TABLE_BYTES / this.clusterSize) throw corrupt(`refcount table of ${h.refcountTableClusters} clusters is too large`);
    // An image without one opens only for a check, which rebuilds it (QEMU refuses it too).
    if (h.refcountTableClusters === 0) throw corrupt('the image has no refcount table (refcount_table_clusters is 0): check -r all rebuilds one');
    this.checkAligned(h.refcountTableOffset, 'refcount table offset');
    this.checkAligned(h.l1TableOffset, 'L1 table offset');

    // QEMU counts the L1 entries the virtual size needs in an int: past that, too big to open.
    if (l1EntriesFor(h.size, img.geometry) > 0x7fffffff) throw unsupported(`size 0x${BigInt(h.size).toString(16)} is too large for qemu's L1 index`);
    if (options.snapshot !== undefined || h.nbSnapshots > 0) {
      img.setSnapshots(await readSnapshotTable(this.store, h.nbSnapshots, h.snapshotsOffset, img.fileSize, img.size));
    }
    if (options.snapshot !== undefined) {
      const snap = findSnapshot(img.snapshots, options.snapshot);
      img.openSnapshot(snap);
      await this.map.loadL1(snap.l1TableOffset, snap.l1Size, `snapshot '${snap.name}' L1 table`);
    } else {
      await this.map.loadL1(h.l1TableOffset, h.l1Size, 'L1 table');
    }

    if (hasFeature(h.incompatibleFeatures, INCOMPAT_DATA_FILE)) {
      if (options.skipDataFile) img.setDataStore(unopenedStore(h.dataFile ?? '', this.readOnly));
      else if (options.openDataFile) img.setDataStore(await options.openDataFile({ readOnly: this.readOnly }));
      else {
        if (h.dataFile === undefined) throw unsupported("'data-file' is required for this image (it has no data file name)");
        if (!options.openFile) throw unsupported(`cannot open external data file '${h.dataFile}' (no file opener)`);
        img.setDataStore(await options.openFile(h.dataFile, { readOnly: this.readOnly }));
      }
    }
    if (h.cryptMethod !== 0) {
      const { openEncryption } = await import('./encryption.js');
      img.setEncryption(await openEncryption(this.store, h, img.fileSize, options));
    }
    // QEMU reads the bitmap directory at open and fails on an entry it cannot load, before it
    // writes anything (a writable open then marks the bitmaps in use): checked here, before the
    // writer attaches, for the callers that want QEMU's rule.
    if (options.refuseMalformedBitmaps) {
      const refusal = (await this.loadBitmapDirectory()).refusalAtOpen();
      if (refusal) throw new QcowError('QCOW_UNSUPPORTED', refusal, { file: this.filename });
    }
    if (h.backingFile !== undefined && options.openBacking) {
      this.backing = await options.openBacking(h.backingFile, h.backingFormat);
    }
  }

  /** Close what init() opened, after it failed. */
  private async releaseOpened(): Promise<void> {
    if (this.image.external) await this.image.dataStore.close().catch(() => undefined);
    await this.backing?.close().catch(() => undefined);
  }

  private checkAligned(offset: number, what: string): void {
    if (offset % this.clusterSize !== 0) throw corrupt(`${what} 0x${offset.toString(16)} is not cluster aligned`);
  }

  // --- read-only views of the state (the modules above own it) ---------------------------------------

  get header(): Readonly<Qcow2Header> {
    return this.image.header;
  }

  get geometry(): Qcow2Geometry {
    return this.image.geometry;
  }

  get l2Context(): L2Context {
    return this.image.l2Context;
  }

  get fileSize(): number {
    return this.image.fileSize;
  }

  /** Where guest data lives: the image itself, or the external data file. */
  get dataStore(): ByteStore {
    return this.image.dataStore;
  }

  get snapshots(): readonly Qcow2Snapshot[] {
    return this.image.snapshots;
  }

  // Snapshot changes load their module when used: most commands never change a snapshot.
  async createSnapshot(name: string): Promise<void> {
    await (await import('./snapshot-write.js')).createSnapshot(this, name);
  }

  async applySnapshot(spec: string): Promise<void> {
    await (await import('./snapshot-write.js')).applySnapshot(this, spec);
  }

  async deleteSnapshot(spec: string): Promise<void> {
    await (await import('./snapshot-write.js')).deleteSnapshot(this, spec);
  }

  /** The snapshot opened with OpenOptions.snapshot, if any (then the device is read-only). */
  get openedSnapshot(): Qcow2Snapshot | undefined {
    return this.image.openedSnapshot;
  }

  get encryption(): Qcow2Encryption | null {
    return this.image.encryption;
  }

  /** The L1 table in use, as raw bytes (read only: the cluster map changes it). */
  get l1(): Uint8Array {
    return this.map.l1;
  }

  get l1Entries(): number {
    return this.map.l1Entries;
  }

  get l2Cache(): TableCache {
    return this.map.l2Cache;
  }

  /** The unit the L2 cache holds (see ClusterMap.slice). */
  get slice(): { entries: number; bytes: number; coverage: number } {
    return this.map.slice;
  }

  /** The write path, present when the image is open read-write. */
  get writer(): Qcow2Writer | null {
    return this.writePath;
  }

  /**
   * Once a corruption found in use marked the image corrupt (the writer's), every request fails,
   * reads too: QEMU drops the node's driver then (qcow2_signal_corruption), and each later request
   * fails with ENOMEDIUM. Created at each call: a cheap path, taken only on a broken image.
   */
  override get unusable(): Error | undefined {
    const broken = this.writePath?.broken;
    // A complete emptying that failed midway gave the image up too (write.ts emptyCompletely).
    return (broken && new ImageMarkedCorrupt(broken, this.filename)) || this.writePath?.ejected;
  }

  /** Incompatible bit 0: refcounts may be stale (lazy refcounts and no clean close). */
  get dirty(): boolean {
    return this.image.dirty;
  }

  get dataFileRaw(): boolean {
    return this.image.dataFileRaw;
  }

  // --- reads ------------------------------------------------------------------------------------------

  protected doRead(offset: number, into: Uint8Array): Promise<void> {
    return this.io.read(offset, into).catch(this.signalCorruption);
  }

  /**
   * A corruption a read or a block status ran into, signalled as QEMU's qcow2 signals it: open
   * read-write, the image is marked corrupt (and unusable for the rest of the session); read-only,
   * the event is only told, once a session (`suppressed` on later ones). Rethrows `e`.
   */
  private readonly signalCorruption = async (e: unknown): Promise<never> => {
    if (e instanceof CorruptionEvent && !e.fatal) {
      if (this.writePath) await this.writePath.markCorrupt(e);
      else this.image.corruption.nonFatal(e);
    }
    throw e;
  };

  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const runs = await this.map.mapRuns(offset, length).catch(this.signalCorruption);
    const img = this.image;
    const external = img.external ? img.dataStore.name : undefined;
    // qemu reports no host offsets for encrypted images (the bytes there are not the guest's).
    const showOffsets = img.encryption === null;
    this.metadataPreallocation ??= external !== undefined ? Promise.resolve(false) : detectMetadataPreallocation(this.store, img.header, img.fileSize);
    const prealloc = await this.metadataPreallocation;
    this.metadataPreallocated = prealloc;
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
    this.readBitmaps ??= this.loadBitmapDirectory();
    return this.readBitmaps;
  }

  /** The bitmaps as the directory on disk has them (read-only: no writer is involved). */
  private async loadBitmapDirectory(): Promise<PersistentBitmaps> {
    const { PersistentBitmaps } = await import('./bitmaps/persistent.js');
    const img = this.image;
    const host = { store: this.store, clusterSize: this.clusterSize, size: this.size, fileSize: () => img.fileSize };
    return PersistentBitmaps.load(host, img.header.bitmaps, hasFeature(img.header.autoclearFeatures, AUTOCLEAR_BITMAPS), this.bitmapLimits).catch((e: unknown) => {
      throw withFile(e, this.filename);
    });
  }

  /** Change the bitmaps (qcow bitmap) with the image's metadata written back and its lock held. */
  async editBitmaps<T>(fn: (bitmaps: PersistentBitmaps) => Promise<T>): Promise<T> {
    return this.requireWriter().editBitmaps(fn);
  }

  async describe(): Promise<ImageDescription> {
    // Loaded when asked for (info, measure): it brings the bitmap directory reader with it.
    const { describeQcow2 } = await import('./describe.js');
    return describeQcow2(this.image, () => this.persistentBitmaps());
  }

  // --- the VM state area ------------------------------------------------------------------------------

  /**
   * Where the VM state starts in the guest address space: at the first L2 table's span past the
   * disk (QEMU's vm_state_offset), so the disk and the state never share a table.
   */
  get vmStateOffset(): number {
    const span = this.image.geometry.l2Coverage;
    return Math.ceil(this.size / span) * span;
  }

  async readVmState(pos: number, into: Uint8Array): Promise<void> {
    this.checkVmStateRange(pos, into.length);
    // Past the L1 table, and where nothing was written, the area reads as zeros.
    await this.io.read(this.vmStateOffset + pos, into);
  }

  async writeVmState(pos: number, data: Uint8Array): Promise<void> {
    this.checkVmStateRange(pos, data.length);
    await this.requireWriter().writeVmState(this.vmStateOffset + pos, data);
  }

  private checkVmStateRange(pos: number, length: number): void {
    const unusable = this.unusable;
    if (unusable) throw unusable;
    if (!Number.isSafeInteger(pos) || pos < 0 || !Number.isSafeInteger(this.vmStateOffset + pos + length)) {
      throw new QcowError('QCOW_OUT_OF_RANGE', `VM state offset ${pos} is out of range`, { file: this.filename });
    }
  }

  // --- writes -----------------------------------------------------------------------------------------

  protected doWrite(offset: number, data: Uint8Array, _options: WriteOptions): Promise<void> {
    // The writer's promise as it is (DeviceBase.write turns a synchronous throw into a rejection).
    return this.requireWriter().write(offset, data);
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
    // As reads (DataIo.read): clusters whose allocation is in flight are not handed out before
    // their data lands; the check follows the mapping, which may have suspended.
    let runs = await this.map.mapRuns(offset, length);
    for (let dep = this.io.allocationInFlight?.(offset, length); dep; dep = this.io.allocationInFlight?.(offset, length)) {
      await dep;
      runs = await this.map.mapRuns(offset, length);
    }
    for (const r of runs) {
      const plain = r.kind === 'normal' && !this.encryption;
      const last = out[out.length - 1];
      if (plain && last?.store && last.hostOffset! + last.length === r.hostOffset) last.length += r.length;
      else if (!plain && last && !last.store) last.length += r.length;
      else out.push(plain ? { offset: r.offset, length: r.length, store: this.dataStore, hostOffset: r.hostOffset! } : { offset: r.offset, length: r.length });
    }
    return out;
  }

  /**
   * See BlockDevice.plainRunNow: one cached L2 table, normal clusters contiguous in the file
   * (ClusterMap.mappedHostRun, what reads use). Not before the first block status has told whether
   * the image has metadata preallocation: its data clusters may then be holes of the file, which
   * block status reports as zeros.
   */
  plainRunNow(offset: number, length: number): PlainRun | undefined {
    if (this.metadataPreallocated !== false || this.unusable || !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.size) return undefined;
    // A cluster whose allocation is in flight (see DataIo.read): the asynchronous way waits for it.
    if (this.io.allocationInFlight?.(offset, length)) return undefined;
    let host: number;
    try {
      host = this.map.mappedHostRun(offset, length);
    } catch {
      // A bad entry: the asynchronous way finds it again and reports it.
      return undefined;
    }
    return host >= 0 ? { store: this.dataStore, hostOffset: host } : undefined;
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

  async resize(size: number, options: ResizeOptions = {}): Promise<void> {
    const writer = this.requireWriter();
    if (!isExactByteCount(size)) throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid size ${size}`);
    // QEMU's qcow2 driver takes whole sectors only.
    if (size % 512 !== 0) throw new QcowError('QCOW_INVALID_ARGUMENT', 'The new size must be a multiple of 512', { file: this.filename });
    const old = this.size;
    const prealloc = options.preallocation ?? 'off';
    if (prealloc !== 'off' && this.encryption) throw new QcowError('QCOW_UNSUPPORTED', `Unsupported preallocation mode for an encrypted image: ${prealloc}`, { file: this.filename });
    await writer.resize(size, options.shrink ?? false);
    // Placed data clusters (falloc, full) hold zeros already, written or reserved, as QEMU's.
    const placed = prealloc !== 'off' && size > old && (await this.preallocate(old, size, prealloc));
    // Growing over a backing image that reaches past the old end: the new range reads as zeros,
    // not as the backing image's bytes there, as QEMU makes it (bdrv_co_truncate's zero write).
    // Opened without its backing image (qemu-img resize's way here), its length is unknown: zero.
    const backingReaches = this.backing ? this.backing.size > old : this.image.header.backingFile !== undefined;
    if (size > old && backingReaches && !placed) await this.writeZeroes(old, size - old);
  }

  /**
   * Map the clusters of [from, to) that a growth added (qemu-img resize --preallocation): each gets
   * a host cluster, as QEMU's preallocation gives it; `metadata` leaves the bytes to the file (holes,
   * which read as zeros), `falloc` reserves them, `full` writes zeros. A partial cluster at the
   * old end is mapped too when it has no host cluster, as QEMU maps it. falloc and full place the
   * data as QEMU does (preallocatePlaced; true is returned then) unless the image has a data file
   * or extended L2 entries.
   */
  private async preallocate(from: number, to: number, mode: 'metadata' | 'falloc' | 'full'): Promise<boolean> {
    const cs = this.clusterSize;
    // Extended L2 entries: QEMU leaves the new subclusters unallocated, which placement does not do.
    if (mode !== 'metadata' && !this.image.external && !this.image.geometry.extendedL2) {
      // A partial cluster at the old end moves with what it holds, as QEMU's copy-on-write moves it.
      const headStart = Math.floor(from / cs) * cs;
      const head = new Uint8Array(from - headStart);
      if (head.length > 0) await this.read(headStart, head);
      const placed = await this.requireWriter().preallocationArea(from, to);
      if (placed >= 0) {
        await this.preallocatePlaced(headStart, to, mode, head);
        return true;
      }
    }
    const headStart = Math.floor(from / cs) * cs;
    let start = Math.ceil(from / cs) * cs;
    let head = new Uint8Array(0);
    if (headStart < from) {
      // The partial cluster at the old end is mapped too when it has no host cluster yet, its bytes
      // before the old end written into it (QEMU's copy-on-write of the allocation); one that has
      // a host cluster keeps it.
      const [r] = await this.map.mapRuns(headStart, Math.min(cs, to - headStart));
      if (r && r.hostOffset === undefined && r.kind !== 'compressed') {
        head = new Uint8Array(from - headStart);
        await this.read(headStart, head);
        start = headStart;
      }
    }
    const put = async ({ offset, store, hostOffset, length }: PlacedRange) => {
      let skip = 0;
      if (head.length > 0 && offset === headStart) {
        await store.write(hostOffset, head);
        skip = head.length;
      }
      if (mode === 'full') {
        for (let at = skip; at < length; at += 1 << 20) await store.write(hostOffset + at, new Uint8Array(Math.min(1 << 20, length - at)));
        return;
      }
      if (mode === 'falloc' && store.allocate && length > skip) await store.allocate(hostOffset + skip, length - skip);
      // The file covers every cluster mapped, as QEMU leaves it.
      if ((await store.size()) < hostOffset + length) await store.truncate(hostOffset + length);
    };
    // In pieces of whole clusters, so a large growth does not map everything in one request.
    const whole = Math.floor(to / cs) * cs;
    const piece = Math.max(cs, Math.floor((64 << 20) / cs) * cs);
    for (let at = start; at < whole; at += piece) await this.requireWriter().writePlaced(at, Math.min(piece, whole - at), put);
    // A partial last cluster is mapped by writing its zeros (after the head, when it is that cluster).
    if (whole < to && whole >= start) {
      const last = new Uint8Array(to - whole);
      if (whole === headStart) last.set(head);
      await this.write(whole, last);
    }
    return false;
  }

  /**
   * preallocate's falloc/full as QEMU lays it out (Qcow2Writer.preallocationArea): the clusters
   * from `headStart` (the one holding the old end) to `to` are linked, in order, to the clusters
   * counted by preallocationArea; the first gets `head` (its guest bytes before the old end), the rest of
   * each is reserved (falloc) or written with zeros (full), whole clusters, so the file ends where
   * QEMU's does.
   */
  private async preallocatePlaced(headStart: number, to: number, mode: 'falloc' | 'full', head: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    // The cluster at the old end is unlinked first, so that the placement below allocates it anew;
    // its blocks stay in the file, as QEMU leaves them.
    if (head.length > 0) await this.requireWriter().unlinkCluster(headStart);
    const put = async ({ offset, store, hostOffset, length }: PlacedRange) => {
      let at = hostOffset;
      const stop = hostOffset + Math.ceil(length / cs) * cs;
      if (head.length > 0 && offset === headStart) {
        await store.write(at, head);
        at += head.length;
      }
      if (mode === 'full') {
        for (; at < stop; at += Math.min(1 << 20, stop - at)) await store.write(at, new Uint8Array(Math.min(1 << 20, stop - at)));
        return;
      }
      if (store.allocate && stop > at) await store.allocate(at, stop - at);
      if ((await store.size()) < stop) await store.truncate(stop);
    };
    const piece = Math.max(cs, Math.floor((64 << 20) / cs) * cs);
    const whole = Math.floor(to / cs) * cs;
    for (let at = headStart; at < whole; at += piece) await this.requireWriter().writePlaced(at, Math.min(piece, whole - at), put);
    if (whole === to) return;
    // A partial last cluster (copy offload takes whole ones) is written with its zeros, after
    // the head when it is also the cluster at the old end; it takes the last counted cluster.
    const last = new Uint8Array(to - whole);
    if (whole === headStart) last.set(head);
    await this.write(whole, last);
  }

  async setBacking(name: string | null, format: string | null): Promise<void> {
    await this.requireWriter().setBacking(name, format);
  }

  async makeEmpty(): Promise<void> {
    await this.requireWriter().makeEmpty();
  }

  // Loaded when an amend runs, as the snapshot writer is: few commands amend an image.
  async amend(options: Record<string, string>, progress?: AmendProgressCallback, context?: AmendContext): Promise<void> {
    await (await import('./amend.js')).amendQcow2(this, options, progress, context);
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
    const img = this.image;
    if (this.writePath) {
      await this.writePath.flush();
      if (img.external) await img.dataStore.flush();
      return;
    }
    await this.map.l2Cache.flush();
    await this.store.flush();
    if (img.external) await img.dataStore.flush();
  }

  protected async doClose(): Promise<void> {
    try {
      if (this.writePath) await this.writePath.close();
      else if (!this.readOnly) await this.flush();
    } finally {
      this.map.l2Cache.clear();
      this.io.forgetCompressed();
      if (this.image.external) await this.image.dataStore.close();
      await this.store.close();
    }
  }
}
