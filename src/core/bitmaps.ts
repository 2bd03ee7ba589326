/**
 * Persistent dirty bitmaps as a capability of a device (`BlockDevice.persistentBitmaps` and
 * `editBitmaps`, as QEMU's drivers have `bdrv_co_can_store_new_dirty_bitmap` and friends): what
 * the operations that use bitmaps (qcow bitmap, backups, changed extents, convert --bitmaps, the
 * NBD qemu:dirty-bitmap context) need of them, whichever format stores them. qcow2 does
 * (formats/qcow2/bitmaps/); raw and qcow v1 have none, as in QEMU.
 */

/**
 * One run of guest bytes whose bits in a persistent dirty bitmap are all set or all clear.
 */
export interface DirtyExtent {
  /** Guest offset where the run starts, in bytes. */
  offset: number;
  /** Length of the run in bytes. */
  length: number;
  /** The run changed since the bitmap was last cleared. */
  dirty: boolean;
}

/** One persistent dirty bitmap, as the image lists it. */
export interface BitmapInfo {
  /** Its name (unique in the image). */
  name: string;
  /** Bytes of guest data one bit stands for. */
  granularity: number;
  /** Flagged in use: recording writes now, or left so by a program that did not close it. */
  inUse: boolean;
  /** Enabled: guest writes are recorded in it (qemu-img's `auto` flag). */
  auto: boolean;
  /** Why the bitmap cannot be used, when it cannot (in use from a crash, bad table...): it can only be removed. */
  unusable?: string;
}

/**
 * The persistent dirty bitmaps of one image. Reading (`list`, `extents`) works on any open;
 * changing them goes through `BlockDevice.editBitmaps`, which holds the image's lock and writes
 * its metadata back. Names not found are QCOW_INVALID_ARGUMENT ("Dirty bitmap 'x' not found").
 */
export interface DirtyBitmaps {
  /** The bitmaps, in the image's order. */
  list(): BitmapInfo[];
  /** The dirty and clean runs of bitmap `name` over [offset, offset + length), in order and merged. */
  extents(name: string, offset: number, length: number): Promise<DirtyExtent[]>;
  /** The same runs one at a time (memory bounded whatever the disk and the bitmap). */
  runs(name: string, offset: number, length: number): AsyncGenerator<DirtyExtent>;
  /** Add an empty bitmap (`granularity` defaults to the format's choice; `disabled`: not recording). */
  add(name: string, options?: { granularity?: number; disabled?: boolean }): Promise<void>;
  /** Remove a bitmap, usable or not. */
  remove(name: string): Promise<void>;
  /** Clear every bit of a bitmap. */
  clear(name: string): Promise<void>;
  /** Start recording guest writes in a bitmap. */
  enable(name: string): Promise<void>;
  /** Stop recording guest writes in a bitmap. */
  disable(name: string): Promise<void>;
  /**
   * Set in `dest` every bit set in `source`, which is a bitmap of these bitmaps or of `from`: the
   * bitmaps of another image of the same size and the same format (a format reads its own kind).
   */
  merge(dest: string, source: string, from?: DirtyBitmaps): Promise<void>;
}
