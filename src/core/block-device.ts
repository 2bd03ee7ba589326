/**
 * The one interface every image format implements. Offsets and lengths are plain numbers of bytes,
 * any alignment; requests beyond `size` fail with QCOW_OUT_OF_RANGE. A device owns its backing
 * device and closes it with itself.
 */
import type { ByteStore } from '../storage/types.js';

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
  offset: number;
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
  compressed?: boolean;
}

/** Where a run of guest bytes sits as plain bytes of a store: copy offload's source side. */
export interface PlainExtent {
  /** Guest offset of the run. */
  offset: number;
  length: number;
  /**
   * The store holding the run's bytes unchanged from `hostOffset`. Absent when they are not plain
   * bytes in this layer (compressed, encrypted, zero, unallocated): read them instead.
   */
  store?: ByteStore;
  hostOffset?: number;
}

/** Where a device wants bytes put: copy offload's target side (see BlockDevice.writePlaced). */
export interface PlacedRange {
  /** Guest offset the bytes belong at. */
  offset: number;
  length: number;
  store: ByteStore;
  hostOffset: number;
}

export interface WriteOptions {
  /** Force unit access: the write is durable when the promise resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** The range may be deallocated instead of written (qemu-io `write -z -u`, NBD without NO_HOLE). */
  mayUnmap?: boolean;
  /** Fail with QCOW_UNSUPPORTED rather than writing zero-filled buffers (NBD FAST_ZERO). */
  fastOnly?: boolean;
}

export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  icount?: number;
  diskSize?: number;
}

/** What a format knows about an image, for `info`. Keys follow qemu-img's JSON where printed. */
export interface ImageDescription {
  format: string;
  virtualSize: number;
  clusterSize?: number;
  encrypted?: boolean;
  dirty?: boolean;
  backingFilename?: string;
  backingFormat?: string;
  snapshots?: SnapshotInfo[];
  /** qemu-img's "format-specific" object: { type, data }. */
  formatSpecific?: { type: string; data: Record<string, unknown> };
}

export interface BlockDevice {
  readonly format: string;
  /** The image's name (path or URL) as opened. */
  readonly filename: string;
  /** Virtual (guest-visible) size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /** Allocation granularity: the cluster size, or 512 for raw. */
  readonly clusterSize: number;
  readonly backing: BlockDevice | null;
  /** The store holding the image itself (for actual-size, locking, and tests). */
  readonly store: ByteStore;

  /** Fill `into` with guest bytes starting at `offset`. */
  read(offset: number, into: Uint8Array): Promise<void>;
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void>;
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
   * Copy offload, target side: write [offset, offset + length) by having `put` store the bytes of
   * each range the device picks for them (allocating as a write would); the device makes them part
   * of the image only after `put` resolves, so a crash mid-copy leaves them unreferenced. Absent,
   * or failing with QCOW_UNSUPPORTED, where the format cannot store plain bytes (encryption).
   */
  writePlaced?(offset: number, length: number, put: (range: PlacedRange) => Promise<void>): Promise<void>;
  /** Store whole clusters compressed (cluster-aligned offset; the last cluster may be short). Absent where unsupported. */
  writeCompressed?(offset: number, data: Uint8Array): Promise<void>;
  flush(): Promise<void>;
  /** Allocation of [offset, offset+length) in this layer only, in order, covering the whole range. */
  blockStatus(offset: number, length: number): Promise<BlockExtent[]>;
  describe(): Promise<ImageDescription>;
  /** Change the virtual size. Absent where the format cannot. */
  resize?(size: number, options?: { shrink?: boolean }): Promise<void>;
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
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** How a format is opened. The chain layer fills in the callbacks; tests may leave them out. */
export interface OpenOptions {
  readOnly?: boolean;
  password?: string;
  /** qcow2: open this internal snapshot (by name or id), read-only. */
  snapshot?: string;
  /** Opens the backing image the format names. Without it, unallocated ranges read as zeros. */
  openBacking?: (name: string, format: string | undefined) => Promise<BlockDevice>;
  /** Opens another file the image names (an external data file), resolved like a backing file. */
  openFile?: (name: string, options: { readOnly: boolean; create?: boolean }) => Promise<ByteStore>;
  /** Budget in bytes for cached metadata (L2 tables, refcount blocks). */
  cacheBytes?: number;
  /**
   * qcow2 persistent bitmaps: data clusters cached for reading, and write ranges held before
   * they are applied to the bitmaps (see formats/qcow2/bitmaps/persistent.ts).
   */
  bitmapLimits?: { cacheClusters?: number; maxPendingRanges?: number };
  /** Open even if the image says it must not be written (corrupt) or needs repair (dirty): read-only inspection. */
  inspectOnly?: boolean;
}

export interface CreateOptions {
  size: number;
  backingFile?: string;
  backingFormat?: string;
  /** -o options, as given (strings). Each format validates its own and rejects unknown ones. */
  options?: Record<string, string>;
  password?: string;
  /** The opened backing image, when the caller has one (e.g. to take its size). */
  backing?: BlockDevice;
  openFile?: (name: string, options: { readOnly: boolean; create?: boolean }) => Promise<ByteStore>;
}

export interface ImageFormat {
  readonly name: string;
  /** How surely `head` (the first 512 bytes or fewer) is this format: 0 = not at all, 100 = certain. */
  probe(head: Uint8Array): number;
  open(store: ByteStore, options?: OpenOptions): Promise<BlockDevice>;
  /** Write a new, empty image into an empty store. */
  create(store: ByteStore, options: CreateOptions): Promise<void>;
  /** -o options this format accepts at create, with help text (for `create -o help`). */
  readonly createOptions?: Record<string, string>;
}
