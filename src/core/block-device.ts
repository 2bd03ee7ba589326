/**
 * The one interface every image format implements. Offsets and lengths are plain numbers of bytes,
 * any alignment; requests beyond `size` fail with QCOW_OUT_OF_RANGE. A device owns its backing
 * device and closes it with itself.
 */
import type { ByteStore } from '../storage/types.js';
import type { CheckResult, RepairMode } from './check.js';
import type { DirtyBitmaps } from './bitmaps.js';
import type { CorruptionEvent } from './errors.js';

// Devices are `await using`-disposable. `Symbol.asyncDispose` is declared in TypeScript's
// esnext.disposable lib and in @types/node; a browser project on an ES2022 lib has neither, and
// would fail to type-check these declarations. Declared here as @types/node does (the same
// declaration merges with either).
declare global {
  interface SymbolConstructor {
    readonly asyncDispose: unique symbol;
  }
}

/** One run of guest bytes with the same allocation state in one layer (what `qemu-img map` shows). */
export interface BlockExtent {
  /** Guest offset where the run starts, in bytes. */
  offset: number;
  /** Length of the run in bytes. */
  length: number;
  /** This layer decides the content. False: the backing image decides (or zeros without one). */
  allocated: boolean;
  /** The range reads as zeros (from this layer's point of view; only meaningful when allocated). */
  zero: boolean;
  /** This layer stores bytes for the range (qemu's "data"). */
  data: boolean;
  /** Where the bytes sit, as plain bytes, in `hostFile` (qemu's "offset"), when they do. */
  hostOffset?: number;
  /** The file holding hostOffset, when it is not the image itself (an external data file). */
  hostFile?: string;
  /** The run is stored compressed (qcow2 or qcow compressed clusters); it has no plain `hostOffset`. */
  compressed?: boolean;
  /**
   * Unallocated in a layer that cannot have a backing file (an NBD export's hole that the server
   * does not call zeros): nothing says the run reads as zeros, and qemu-img map shows "zero": false.
   */
  zeroUnknown?: boolean;
}

/** Where a run of guest bytes lies as plain bytes (BlockDevice.plainRunNow). */
export interface PlainRun {
  /** The store holding the run's bytes unchanged. */
  store: ByteStore;
  /** Byte offset in `store` where the run's bytes start. */
  hostOffset: number;
}

/** Where a run of guest bytes sits as plain bytes of a store: copy offload's source side. */
export interface PlainExtent {
  /** Guest offset of the run. */
  offset: number;
  /** Length of the run in bytes. */
  length: number;
  /**
   * The store holding the run's bytes unchanged from `hostOffset`. Absent when they are not plain
   * bytes in this layer (compressed, encrypted, zero, unallocated): read them instead.
   */
  store?: ByteStore;
  /** Byte offset in `store` where the run's bytes start (set together with `store`). */
  hostOffset?: number;
}

/** Where a device wants bytes put: copy offload's target side (see BlockDevice.writePlaced). */
export interface PlacedRange {
  /** Guest offset the bytes belong at. */
  offset: number;
  /** Length of the range in bytes. */
  length: number;
  /** The store to write the bytes into (the image file, or its external data file). */
  store: ByteStore;
  /** Byte offset in `store` where the range's bytes go. */
  hostOffset: number;
}

/** Options of {@link BlockDevice.write}. */
export interface WriteOptions {
  /** Force unit access: the write is durable when the promise resolves. */
  fua?: boolean;
}

/** Options of {@link BlockDevice.writeZeroes}. */
export interface ZeroOptions extends WriteOptions {
  /** The range may be deallocated instead of written (qemu-io `write -z -u`, NBD without NO_HOLE). */
  mayUnmap?: boolean;
  /** Fail with QCOW_UNSUPPORTED rather than writing zero-filled buffers (NBD FAST_ZERO). */
  fastOnly?: boolean;
}

/** One internal snapshot of a qcow2 image, as `qemu-img snapshot -l` and `info` list it. */
export interface SnapshotInfo {
  /** The snapshot's unique id string (QEMU numbers them "1", "2", ...). */
  id: string;
  /** The snapshot's name (the tag given at `snapshot -c`). */
  name: string;
  /** Size in bytes of the saved VM state (RAM, devices); 0 for a disk-only snapshot. */
  vmStateSize: number;
  /** Wall-clock time the snapshot was taken: seconds since the Unix epoch. */
  dateSec: number;
  /** Nanoseconds part of the time the snapshot was taken. */
  dateNsec: number;
  /** The guest's virtual clock at the snapshot, in nanoseconds. */
  vmClockNsec: number;
  /** The guest's instruction count at the snapshot (record/replay), when the image stores one. */
  icount?: number;
  /** The virtual disk size when the snapshot was taken, when the image stores it. */
  diskSize?: number;
}

/** What a format knows about an image, for `info`. Keys follow qemu-img's JSON where printed. */
export interface ImageDescription {
  /** The format's name ("qcow2", "qcow", "raw"). */
  format: string;
  /** Virtual (guest-visible) size in bytes. */
  virtualSize: number;
  /** Cluster size in bytes, for formats that have clusters. */
  clusterSize?: number;
  /** The image's data is encrypted (LUKS or legacy AES). */
  encrypted?: boolean;
  /** qcow2: the dirty bit is set (lazy refcounts, not closed cleanly): refcounts need a repair. */
  dirty?: boolean;
  /**
   * False when the image has no driver information to give, as QEMU's null-co node (and raw over
   * it): qemu-img info then says nothing of a dirty flag. Absent: it has.
   */
  driverInfo?: false;
  /** The backing file name as recorded in the header, unresolved. */
  backingFilename?: string;
  /** The backing file's format as recorded in the header, when it is. */
  backingFormat?: string;
  /** The image's internal snapshots (qcow2), in the order of its snapshot table. */
  snapshots?: SnapshotInfo[];
  /** qemu-img's "format-specific" object: { type, data }. */
  formatSpecific?: {
    /** The format's name, as qemu-img prints it ("qcow2"). */
    type: string;
    /** Format-specific fields (compat level, features, bitmaps...), with qemu-img's keys. */
    data: Record<string, unknown>;
  };
}

/**
 * An open disk image: guest bytes read and written at byte offsets, whatever the format. Every
 * open function returns one ({@link openImageWith}, and `openImage` of `qcow/node`); formats
 * implement it (most by extending {@link DeviceBase}). Close it when done (or `await using`).
 *
 * @example
 * ```ts
 * import { openImage } from 'qcow/node';
 *
 * await using dev = await openImage('disk.qcow2', { readOnly: true });
 * const sector = new Uint8Array(512);
 * await dev.read(0, sector);
 * console.log(dev.format, dev.size, await dev.blockStatus(0, dev.size));
 * ```
 */
export interface BlockDevice {
  /** The format's name ("qcow2", "qcow", "raw"). */
  readonly format: string;
  /** The image's name (path or URL) as opened. */
  readonly filename: string;
  /** Virtual (guest-visible) size in bytes. */
  readonly size: number;
  /** Opened read-only: writes, discards and resizes fail with QCOW_READ_ONLY. */
  readonly readOnly: boolean;
  /** Allocation granularity: the cluster size, or 512 for raw. */
  readonly clusterSize: number;
  /** The opened backing image (the next layer of the chain), or null when there is none or it was not opened. */
  readonly backing: BlockDevice | null;
  /** The store holding the image itself (for actual-size, locking, and tests). */
  readonly store: ByteStore;
  /**
   * Set once a corruption found while the image was in use made it unusable for the rest of the
   * session (qcow2 marks the image corrupt then, as QEMU does): the error every later request
   * fails with, reads included. Undefined while the device is usable, and where formats never
   * give up on an image.
   */
  readonly unusable?: Error | undefined;

  /** Fill `into` with guest bytes starting at `offset`. */
  read(offset: number, into: Uint8Array): Promise<void>;
  /** Write `data` as guest bytes starting at `offset` (allocating clusters as needed). */
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void>;
  /** Make the range read as zeros, with zero flags or deallocation where the format can instead of writing zeros. */
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void>;
  /** Drop the range's data where the format can; afterwards it may read as zero or as the backing image. */
  discard(offset: number, length: number): Promise<void>;
  /**
   * Copy offload, source side: [offset, offset + length) of this layer in runs, each either plain
   * bytes of a store (which the kernel can copy file to file) or not. Absent where the format
   * never stores guest bytes as they are.
   */
  plainExtents?(offset: number, length: number): Promise<PlainExtent[]>;
  /**
   * [offset, offset + length) when it is one run of data (what block status calls data, not
   * zero) stored as plain bytes of one store, and the device knows so now, from metadata it holds
   * (no I/O, no promise): where in which store. Undefined whenever it is not so or not known now
   * (an empty or invalid range, an unusable device): the caller then takes the asynchronous way
   * (blockStatus, plainExtents, read), which decides and reports errors. For servers answering
   * reads from the page cache, where the promises of the asynchronous way cost more than the read.
   */
  plainRunNow?(offset: number, length: number): PlainRun | undefined;
  /**
   * Copy offload, target side: write [offset, offset + length) by having `put` store the bytes of
   * each range the device picks for them (allocating as a write would); the device makes them part
   * of the image only after `put` resolves, so a crash mid-copy leaves them unreferenced. Absent,
   * or failing with QCOW_UNSUPPORTED, where the format cannot store plain bytes (encryption).
   */
  writePlaced?(offset: number, length: number, put: (range: PlacedRange) => Promise<void>): Promise<void>;
  /** Store whole clusters compressed (cluster-aligned offset; the last cluster may be short). Absent where unsupported. */
  writeCompressed?(offset: number, data: Uint8Array): Promise<void>;
  /**
   * The most clusters one writeCompressed call may hold; absent: one (qcow v1 stores one per call,
   * as QEMU's qcow driver does). A caller with a run of clusters to compress makes as few calls as
   * this allows: each call costs a device its ordering, locking and promises.
   */
  readonly writeCompressedMaxClusters?: number;
  /** Write cached metadata out and make everything written so far durable (fsync). */
  flush(): Promise<void>;
  /** Allocation of [offset, offset+length) in this layer only, in order, covering the whole range. */
  blockStatus(offset: number, length: number): Promise<BlockExtent[]>;
  /** What the format knows about the image (the material of `qemu-img info`). */
  describe(): Promise<ImageDescription>;
  /**
   * Change the virtual size. Absent where the format cannot. `shrink` allows making it smaller;
   * `preallocation` (growing only; qemu-img resize's option) reserves the new range: `metadata`
   * maps it (qcow2), `falloc` also reserves the file's blocks, `full` also writes them.
   */
  resize?(size: number, options?: ResizeOptions): Promise<void>;
  /**
   * Rewrite the backing file name and format recorded in the header (null: no backing file), as
   * `qemu-img rebase` does. Only the header changes: no data is copied and `backing` is not
   * reopened. Absent where the format has no backing files.
   */
  setBacking?(name: string | null, format: string | null): Promise<void>;
  /**
   * Deallocate every cluster of the active layer so that all of it reads from the backing image
   * again (`qemu-img commit` empties the overlay this way). Unlike discard, never leaves zero flags.
   */
  makeEmpty?(): Promise<void>;
  /**
   * Internal snapshots (`qemu-img snapshot -c/-a/-d`): save the active layer's state under
   * `name`; revert the active layer to a snapshot; delete one. A snapshot is named by its name or
   * id, or qemu-img's `snapshot.name=N` / `snapshot.id=I`. Absent where the format has none.
   */
  createSnapshot?(name: string): Promise<void>;
  /** Revert the active layer to the snapshot `spec` names (see {@link createSnapshot}). */
  applySnapshot?(spec: string): Promise<void>;
  /** Delete the snapshot `spec` names, freeing what only it held (see {@link createSnapshot}). */
  deleteSnapshot?(spec: string): Promise<void>;
  /**
   * The VM state area (what QEMU's savevm stores with the disk; `qemu-io -b`): bytes at `pos` of a
   * second address space kept in the image past the guest disk, saved and restored with internal
   * snapshots. Reads of what was never written give zeros. Absent where the format has none
   * (raw, qcow v1, as in QEMU).
   */
  readVmState?(pos: number, into: Uint8Array): Promise<void>;
  /** Write `data` at `pos` of the VM state area (see {@link readVmState}); the device must be writable. */
  writeVmState?(pos: number, data: Uint8Array): Promise<void>;
  /**
   * The image's persistent dirty bitmaps, for reading (`qemu-img bitmap`, `qemu-nbd -B`): on a
   * writable image they include the writes recorded so far. Absent where the format has none
   * (raw, qcow v1, as in QEMU).
   */
  persistentBitmaps?(): Promise<DirtyBitmaps>;
  /**
   * Change the persistent dirty bitmaps inside `fn`, with the image's lock held and its metadata
   * written back around it (the device must be writable). Absent where the format has none.
   */
  editBitmaps?<T>(fn: (bitmaps: DirtyBitmaps) => Promise<T>): Promise<T>;
  /**
   * Change options of the image in place (`qemu-img amend -o`): `options` are the -o key=value
   * pairs as given, which the format validates ({@link ImageFormat.amendOptions} lists them).
   * Absent where the format has nothing to amend (raw, qcow v1, as in QEMU). `progress` is told
   * (done, total) as the work goes, in the units the format counts (qemu-img amend -p draws it).
   */
  amend?(options: Record<string, string>, progress?: AmendProgressCallback, context?: AmendContext): Promise<void>;
  /** Write out what the device still holds (when writable), release its store, and close its backing chain. */
  close(): Promise<void>;
  /** The same as {@link close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** QEMU's names of the metadata structures its qcow2 overlap check can check (`overlap-check.<name>`). */
export type OverlapCheck =
  | 'main-header'
  | 'active-l1'
  | 'active-l2'
  | 'refcount-table'
  | 'refcount-block'
  | 'snapshot-table'
  | 'inactive-l1'
  | 'inactive-l2'
  | 'bitmap-directory';

/** QEMU's qcow2 `overlap-check` option: a level (its templates) and per-structure switches over it. */
export interface OverlapCheckOptions {
  /** none, constant, cached (QEMU's default) or all (cached and the snapshots' L2 tables). */
  level?: 'none' | 'constant' | 'cached' | 'all';
  /** Structures switched on or off whatever the level says. */
  checks?: Partial<Record<OverlapCheck, boolean>>;
}

/** How a format is opened. The chain layer fills in the callbacks; tests may leave them out. */
export interface OpenOptions {
  /** Open read-only: writes fail with QCOW_READ_ONLY, and the format writes nothing to the store. */
  readOnly?: boolean;
  /** The passphrase of an encrypted image (LUKS or legacy AES). */
  password?: string;
  /** qcow2: open this internal snapshot (by name or id), read-only. */
  snapshot?: string;
  /** Opens the backing image the format names. Without it, unallocated ranges read as zeros. */
  openBacking?: (name: string, format: string | undefined) => Promise<BlockDevice>;
  /** Opens another file the image names (an external data file), resolved like a backing file. */
  openFile?: (name: string, options: { readOnly: boolean; create?: boolean }) => Promise<ByteStore>;
  /**
   * qcow2: opens the external data file the caller names instead of the one the header records
   * (QEMU's `data-file` open option; the header may record none).
   */
  openDataFile?: (options: { readOnly: boolean }) => Promise<ByteStore>;
  /**
   * qcow2: leave the external data file closed, as `qemu-img info` does (QEMU 7.2's stable
   * releases open an image for info without I/O, so a missing data file, or a header without its
   * name, does not stop it). The metadata can be shown; guest data cannot be read.
   */
  skipDataFile?: boolean;
  /** Budget in bytes for cached metadata (L2 tables, refcount blocks). */
  cacheBytes?: number;
  /**
   * qcow2 persistent bitmaps: data clusters cached for reading, and write ranges held before
   * they are applied to the bitmaps (see formats/qcow2/bitmaps/persistent.ts).
   */
  bitmapLimits?: {
    /** How many bitmap data clusters are kept cached for reading. */
    cacheClusters?: number;
    /** How many written ranges are held before they are applied to the bitmaps. */
    maxPendingRanges?: number;
  };
  /**
   * Open for inspection only: an encrypted image opens without its password (its description and
   * layout can be shown; reading guest data fails). Corrupt and dirty images need no option to be
   * opened read-only: like QEMU, only writing them is refused (corrupt) or needs a repair first
   * (dirty, lazy refcounts).
   */
  inspectOnly?: boolean;
  /**
   * qcow2: fail to open, as QEMU does, when the persistent-bitmap directory has an entry QEMU
   * cannot load (granularity, type, unknown flags, table size or alignment). Without it such a
   * bitmap is listed as unusable and can still be removed (`qcow check -r all`, `bitmap --remove`),
   * which QEMU cannot do. The compat front ends (compat/qemu-img, compat/qemu-io) ask for it.
   */
  refuseMalformedBitmaps?: boolean;
  /**
   * qcow2, opened read-write: use lazy refcounts (or not) whatever the image's lazy_refcounts bit
   * says, for this open only (QEMU's `lazy-refcounts` option). With them, refcount changes stay in
   * memory until the image is closed, and the dirty bit is set meanwhile.
   */
  lazyRefcounts?: boolean;
  /**
   * qcow2, opened read-write: whether a cluster left with no reference by a guest discard or an
   * unmapping zero write (`request`), by a deleted snapshot or an emptied image (`snapshot`), or by
   * metadata given up (`other`) has its blocks given back to the filesystem (QEMU's
   * pass-discard-request, -snapshot and -other options; by default on, on and off, as QEMU opens an
   * image with discard=unmap). Discards and unmapping zero writes punch at once, as QEMU does.
   */
  discardPassthrough?: DiscardPassthrough;
  /**
   * qcow2, opened read-write: which metadata structures a write is checked against before it is
   * made (QEMU's `overlap-check` option; default its "cached" level). See formats/qcow2/overlap.ts.
   */
  overlapCheck?: OverlapCheckOptions;
  /**
   * qcow2, opened read-write while dirty (lazy refcounts, not closed cleanly): the image is repaired
   * at open, and this is called with the repair's messages (what QEMU prints while it opens one).
   */
  onRepair?: (messages: readonly string[]) => void;
  /**
   * Told what QEMU prints on standard error about a step that failed while the operation went on
   * (qcow2: "qcow2_free_clusters failed: Invalid argument" when the clusters of a snapshot table
   * the header placed past the end of the file are freed). Without it, such a failure is silent.
   */
  onWarning?: (message: string) => void;
  /**
   * qcow2: told each corruption event as the image signals it (QEMU's qcow2_signal_corruption),
   * before the request that ran into it fails, or goes on when the event is not fatal (a cluster
   * that cannot be freed is leaked). `fatal` events marked the image corrupt; events QEMU would
   * suppress (any after the image was marked, a non-fatal one after an earlier event) are not told.
   */
  onCorruption?: (event: CorruptionEvent) => void;
  /**
   * raw: the image is the part of the file from `offset` (default 0), `size` bytes long (default:
   * to the end of the file), as QEMU's raw `offset` and `size` options. With a size the image
   * cannot grow or shrink; reads and writes past it are refused like any past the end.
   */
  rawWindow?: RawWindow;
  /**
   * raw, opened writable after its format was probed (not given): names the format other than raw
   * that a first sector of these bytes would be probed as, or undefined. A write, zero write or
   * discard that would leave such bytes in block 0 is refused (EPERM), as QEMU restricts probed
   * raw images: otherwise a guest could write an image header naming any host file as its backing
   * file, and the next open without a format would follow it. openImage sets it.
   */
  probedHeader?: (head: Uint8Array) => string | undefined;
}

/** How {@link BlockDevice.resize} changes the size. */
export interface ResizeOptions {
  /** Allow making the image smaller (data past the new end is lost). */
  shrink?: boolean;
  /** Reserve the range a growth adds: see BlockDevice.resize. Formats refuse modes they lack. */
  preallocation?: Preallocation;
}

/** qemu-img's preallocation modes. */
export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/** Part of a file as a raw image: see OpenOptions.rawWindow. */
export interface RawWindow {
  /** Where the image starts in the file, in bytes. */
  offset?: number;
  /** The image's size in bytes (a multiple of 512); absent: to the end of the file. */
  size?: number;
}

/** What a format needs to write a new image ({@link ImageFormat.create}). */
export interface CreateOptions {
  /** Virtual size in bytes. */
  size: number;
  /** The backing file name to record in the header (as given: relative names are kept relative). */
  backingFile?: string;
  /** The backing file's format to record in the header. */
  backingFormat?: string;
  /** -o options, as given (strings). Each format validates its own and rejects unknown ones. */
  options?: Record<string, string>;
  /** The passphrase for an encrypted image (with the format's encryption options). */
  password?: string;
  /** The opened backing image, when the caller has one (e.g. to take its size). */
  backing?: BlockDevice;
  /** Opens or creates another file the new image names (a qcow2 external data file). */
  openFile?: (name: string, options: { readOnly: boolean; create?: boolean }) => Promise<ByteStore>;
}

/** What {@link ImageFormat.measure} is asked: a new image of this format, for a size or a copy. */
export interface MeasureRequest {
  /** The new image's -o options, as given (the format checks them as `qemu-img measure` does). */
  options: Record<string, string>;
  /** Measure an empty image of this virtual size (exactly one of `size` and `source`)... */
  size?: number;
  /** ...or a copy of this image (its whole backing chain as the guest sees it). */
  source?: BlockDevice;
  /**
   * With `source`: bytes of the whole clusters of `clusterSize` bytes that hold source data, as
   * the chain reads (zero and unallocated ranges need none). The caller scans the source once the
   * format has chosen its cluster size.
   */
  sourceDataBytes?: (clusterSize: number) => Promise<number>;
  /** Stops a long scan of the source; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
}

/** What `qemu-img measure` reports: bytes of the new image file. */
export interface MeasureResult {
  /** Bytes the source's persistent bitmaps would take: only when both source and target can hold them. */
  bitmaps?: number;
  /** The file size a copy (or an empty image) takes: metadata and the clusters that hold data. */
  required: number;
  /** The file size with every cluster of the virtual disk allocated. */
  'fully-allocated': number;
}

/**
 * One image format: probing, opening and creating. The built-in ones come from
 * {@link builtinFormats}; a {@link FormatRegistry} holds the set an open function may use.
 */
export interface ImageFormat {
  /** The format's name, as given to `-f` ("qcow2", "qcow", "raw"). */
  readonly name: string;
  /** How surely `head` (the first 512 bytes or fewer) is this format: 0 = not at all, 100 = certain. */
  probe(head: Uint8Array): number;
  /** Open the image held by `store` (only this layer: backing images come through `options.openBacking`). */
  open(store: ByteStore, options?: OpenOptions): Promise<BlockDevice>;
  /** Write a new, empty image into an empty store. */
  create(store: ByteStore, options: CreateOptions): Promise<void>;
  /** -o options this format accepts at create, with help text (for `create -o help`). */
  readonly createOptions?: Record<string, string>;
  /**
   * -o options its devices' {@link BlockDevice.amend} accepts, with help text (for `amend -o
   * help`). Absent where the format has no amend.
   */
  readonly amendOptions?: Record<string, string>;
  /**
   * How large a new image of this format would be (`qemu-img measure`, QEMU's `bdrv_measure`).
   * Absent where the format cannot say (qcow v1, as in QEMU).
   */
  measure?(request: MeasureRequest): Promise<MeasureResult>;
  /**
   * Check the image's metadata for consistency, and with `repair` fix what it can (`qemu-img
   * check`). Absent for formats with nothing to check (raw, qcow v1, as in QEMU).
   */
  check?(store: ByteStore, options?: { repair?: RepairMode }): Promise<CheckResult>;
}

/** What an amend needs beyond its options (see {@link BlockDevice.amend}). */
export interface AmendContext {
  /** qemu-img amend --force: do what may lose data (overwrite an active LUKS key slot, erase the last one). */
  force?: boolean;
  /** The password a secret id names (LUKS `new-secret`, `old-secret`); throws when there is none. */
  secret?: (id: string) => string;
}

/** How far an amend is: `done` of `total` units of work (the total may change as the work goes). */
export type AmendProgressCallback = (done: number, total: number) => void;

/** Which freed qcow2 clusters are given back to the filesystem, by why they were freed (QEMU's pass-discard-* options). */
export interface DiscardPassthrough {
  /** A guest discard or an unmapping zero write (pass-discard-request; default on). */
  request?: boolean;
  /** A deleted snapshot or an emptied image (pass-discard-snapshot; default on). */
  snapshot?: boolean;
  /** Metadata given up, such as an old table replaced by a new one (pass-discard-other; default off). */
  other?: boolean;
}
