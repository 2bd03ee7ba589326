/**
 * A writable copy-on-write layer over any read-only device: writes land in blocks of a local
 * store (memory by default), reads take written blocks from there and everything else from the
 * base. The base is never written, so a remote image can be used as a disk without touching it.
 *
 * The block index lives in memory, so the layer lasts as long as this object: it is a scratch
 * disk, not an image file (a qcow2 file over the base is the persistent way).
 */
import type { BlockDevice, BlockExtent, ImageDescription, WriteOptions, ZeroOptions } from '../core/block-device.js';
import { DeviceBase } from '../core/device-base.js';
import { QcowError } from '../core/errors.js';
import { Mutex } from '../core/mutex.js';
import { MemoryStore } from '../storage/memory.js';
import type { ByteStore } from '../storage/types.js';

/** Options of {@link OverlayDevice} and {@link overlay}: where written blocks go and how many may be held. */
export interface OverlayOptions {
  /**
   * Where written blocks are kept; a new MemoryStore by default. Any writable store works (a
   * browser could give one over OPFS), but its bytes mean nothing without this object's index.
   */
  store?: ByteStore;
  /** Copy-on-write granularity: a power of two from 512 to 2 MiB. Default 4 KiB. */
  blockSize?: number;
  /** Most bytes of blocks the layer may hold; writes beyond it fail with QCOW_IO. Default: no limit. */
  maxBytes?: number;
}

/** Index value of a block written as zeros: it reads as zeros and holds no bytes. */
const ZERO = -1;

/**
 * A writable copy-on-write layer over any device, held in a store of its own (memory by default):
 * use a read-only or remote image as a scratch disk without changing it. The index of written
 * blocks lives in this object, so the writes last only as long as it does. Closing it closes
 * the base too.
 *
 * @example
 * ```ts
 * import { openImage, OverlayDevice } from 'qcow/node';
 *
 * const base = await openImage('https://example.com/disk.qcow2', { readOnly: true });
 * const disk = new OverlayDevice(base, { maxBytes: 256 * 2 ** 20 });
 * await disk.write(0, new Uint8Array(512)); // lands in memory; the image is untouched
 * ```
 */
export class OverlayDevice extends DeviceBase {
  /** Always "overlay". */
  readonly format = 'overlay';
  /** The copy-on-write block size ({@link OverlayOptions.blockSize}). */
  readonly clusterSize: number;
  private readonly base: BlockDevice;
  /** Block number -> where its bytes sit in the store (or ZERO). Absent: the base decides. */
  private readonly blocks = new Map<number, number>();
  /** Store slots of blocks that were discarded or zeroed, for reuse. */
  private readonly freeSlots: number[] = [];
  /** Slots freed while reads were under way: one of those reads may still be reading the slot. */
  private retiredSlots: number[] = [];
  private readsUnderWay = 0;
  private storeEnd = 0;
  private readonly maxBytes: number;
  private readonly lock = new Mutex();

  /** A new, empty layer over `base`, with its size; QCOW_INVALID_ARGUMENT for a bad block size, QCOW_READ_ONLY for a read-only store. */
  constructor(base: BlockDevice, options: OverlayOptions = {}) {
    const blockSize = options.blockSize ?? 4096;
    if (!Number.isInteger(blockSize) || blockSize < 512 || blockSize > 2 * 2 ** 20 || (blockSize & (blockSize - 1)) !== 0) {
      throw new QcowError('QCOW_INVALID_ARGUMENT', `overlay block size must be a power of two from 512 to 2 MiB, not ${blockSize}`);
    }
    const store = options.store ?? new MemoryStore(undefined, { name: `overlay of ${base.filename}` });
    if (store.readOnly) throw new QcowError('QCOW_READ_ONLY', 'the overlay store must be writable', { file: store.name });
    super(store, base.size, false);
    this.base = base;
    this.backing = base;
    this.clusterSize = blockSize;
    this.maxBytes = options.maxBytes ?? Infinity;
  }

  /** Bytes of written blocks the layer holds now. */
  get heldBytes(): number {
    return (this.storeEnd / this.clusterSize - this.freeSlots.length - this.retiredSlots.length) * this.clusterSize;
  }

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    this.readsUnderWay++;
    try {
      await this.readBlocks(offset, into);
    } finally {
      if (--this.readsUnderWay === 0 && this.retiredSlots.length > 0) {
        this.freeSlots.push(...this.retiredSlots);
        this.retiredSlots = [];
      }
    }
  }

  private async readBlocks(offset: number, into: Uint8Array): Promise<void> {
    const end = offset + into.length;
    for (let pos = offset; pos < end; ) {
      const block = this.blockOf(pos);
      const slot = this.blocks.get(block);
      let stop = Math.min(end, this.blockEnd(block));
      const view = () => into.subarray(pos - offset, stop - offset);
      if (slot === undefined) {
        // Ask the base for the whole run of unwritten blocks at once: it may be remote.
        while (stop < end && !this.blocks.has(this.blockOf(stop))) stop = Math.min(end, this.blockEnd(this.blockOf(stop)));
        await this.readBacking(pos, view());
      } else if (slot === ZERO) {
        view().fill(0);
      } else {
        await this.store.read(slot + (pos - block * this.clusterSize), view());
      }
      pos = stop;
    }
  }

  protected doWrite(offset: number, data: Uint8Array, _options: WriteOptions): Promise<void> {
    return this.lock.run(() => this.writeBlocks(offset, data));
  }

  protected override doWriteZeroes(offset: number, length: number, _options: ZeroOptions): Promise<void> {
    return this.lock.run(async () => {
      await this.eachBlock(offset, length, async (block, from, to, whole) => {
        if (whole) this.setBlock(block, ZERO);
        else await this.writeBlocks(from, new Uint8Array(to - from));
      });
    });
  }

  /** Whole blocks go back to showing the base (allowed: discarded ranges may read as the backing image). */
  protected override doDiscard(offset: number, length: number): Promise<void> {
    return this.lock.run(() =>
      this.eachBlock(offset, length, async (block, _from, _to, whole) => {
        if (whole) this.setBlock(block, undefined);
      }),
    );
  }

  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const out: BlockExtent[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const block = this.blockOf(pos);
      const slot = this.blocks.get(block);
      const stop = Math.min(end, this.blockEnd(block));
      const at = pos - block * this.clusterSize;
      const e: BlockExtent =
        slot === undefined
          ? { offset: pos, length: stop - pos, allocated: false, zero: false, data: false }
          : slot === ZERO
            ? { offset: pos, length: stop - pos, allocated: true, zero: true, data: false }
            : { offset: pos, length: stop - pos, allocated: true, zero: false, data: true, hostOffset: slot + at };
      // Runs of one kind are joined here rather than by mergeExtents, so a mostly unwritten
      // multi-gigabyte disk gives a few extents, not one per block.
      const last = out[out.length - 1];
      if (last && last.allocated === e.allocated && last.zero === e.zero && last.data === e.data && (!e.data || last.hostOffset! + last.length === e.hostOffset)) {
        last.length += e.length;
      } else out.push(e);
      pos = stop;
    }
    return out;
  }

  /** Format "overlay", the base's size, the block size, and the base as backing file. */
  async describe(): Promise<ImageDescription> {
    return { format: this.format, virtualSize: this.size, clusterSize: this.clusterSize, backingFilename: this.base.filename, backingFormat: this.base.format };
  }

  /** Flush the overlay's store (the index is in memory only). */
  async flush(): Promise<void> {
    await this.store.flush();
  }

  protected async doClose(): Promise<void> {
    this.blocks.clear();
    await this.store.close();
  }

  /** Copy-on-write: a block written in part is first filled from what it showed before. */
  private async writeBlocks(offset: number, data: Uint8Array): Promise<void> {
    await this.eachBlock(offset, data.length, async (block, from, to, whole) => {
      const piece = data.subarray(from - offset, to - offset);
      const slot = this.blocks.get(block);
      if (slot !== undefined && slot !== ZERO) {
        await this.store.write(slot + (from - block * this.clusterSize), piece);
        return;
      }
      let bytes = piece;
      if (!whole) {
        const start = block * this.clusterSize;
        bytes = new Uint8Array(this.blockEnd(block) - start);
        if (slot === undefined) await this.readBacking(start, bytes);
        bytes.set(piece, from - start);
      }
      const fresh = this.takeSlot();
      await this.store.write(fresh, bytes);
      // The index changes only once the bytes are in place, so a concurrent read sees old or new.
      this.blocks.set(block, fresh);
    });
  }

  private async eachBlock(offset: number, length: number, fn: (block: number, from: number, to: number, whole: boolean) => Promise<void>): Promise<void> {
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const block = this.blockOf(pos);
      const blockEnd = this.blockEnd(block);
      const stop = Math.min(end, blockEnd);
      await fn(block, pos, stop, pos === block * this.clusterSize && stop === blockEnd);
      pos = stop;
    }
  }

  private setBlock(block: number, slot: number | undefined): void {
    const old = this.blocks.get(block);
    if (old !== undefined && old !== ZERO) (this.readsUnderWay > 0 ? this.retiredSlots : this.freeSlots).push(old);
    if (slot === undefined) this.blocks.delete(block);
    else this.blocks.set(block, slot);
  }

  private takeSlot(): number {
    const reused = this.freeSlots.pop();
    if (reused !== undefined) return reused;
    if (this.heldBytes + this.clusterSize > this.maxBytes) {
      throw new QcowError('QCOW_IO', `the overlay is full (maxBytes ${this.maxBytes})`, { file: this.filename });
    }
    const slot = this.storeEnd;
    this.storeEnd += this.clusterSize;
    return slot;
  }

  private blockOf(pos: number): number {
    return Math.floor(pos / this.clusterSize);
  }

  /** The last block of a device whose size is not a multiple of the block size is short. */
  private blockEnd(block: number): number {
    return Math.min(this.size, (block + 1) * this.clusterSize);
  }
}

/** A writable in-memory layer over `base` (which may be read-only, e.g. an image over HTTP). */
export function overlay(base: BlockDevice, options?: OverlayOptions): OverlayDevice {
  return new OverlayDevice(base, options);
}
