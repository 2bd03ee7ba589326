/**
 * The allocation views of an export. base:allocation: for each run of guest bytes, whether the chain stores
 * data for it (NBD_STATE_HOLE when not) and whether it reads as zeros (NBD_STATE_ZERO). These are
 * the same two bits qemu-nbd derives from its block status (HOLE = not "data", ZERO = "zero"), so
 * `nbdinfo --map` on our export agrees with `qemu-img map` / `qcow map` on the image.
 *
 * ChainStatus asks each layer about large windows ahead, which suits a walk over a whole image.
 * A request only needs its own range, so the chain is viewed through devices clipped to the end
 * of the request: no layer is asked about bytes the client did not ask for.
 */
import type { BlockDevice, BlockExtent, ImageDescription, WriteOptions, ZeroOptions } from '../core/block-device.js';
import { ChainStatus, type ChainExtent } from '../ops/chain-status.js';
import type { ByteStore } from '../storage/types.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from './constants.js';

export interface AllocationExtent {
  offset: number;
  length: number;
  /** NBD_STATE_HOLE | NBD_STATE_ZERO bits. */
  flags: number;
}

/**
 * Extents covering [offset, offset + length), neighbours with equal flags merged, at most
 * `maxExtents` of them (then they cover a prefix of the range; the spec allows a short answer).
 */
export function allocationExtents(dev: BlockDevice, offset: number, length: number, maxExtents = Number.MAX_SAFE_INTEGER): Promise<AllocationExtent[]> {
  if (!dev.backing) return layerExtents(dev, offset, length, maxExtents);
  return chainExtents(dev, offset, length, maxExtents, allocationFlags);
}

const allocationFlags = (e: ChainExtent) => (e.data ? 0 : NBD_STATE_HOLE) | (e.zero ? NBD_STATE_ZERO : 0);

/**
 * allocationExtents of an image without a backing file, from its own block status in one call:
 * what ChainStatus would say of a chain of one (unallocated: a hole of zeros), without its
 * cursors, views and per-extent objects. Structured reads ask this before every read.
 */
async function layerExtents(dev: BlockDevice, offset: number, length: number, maxExtents: number): Promise<AllocationExtent[]> {
  const end = offset + length;
  const out: AllocationExtent[] = [];
  let pos = offset;
  for (const e of await dev.blockStatus(offset, length)) {
    const to = Math.min(end, e.offset + e.length);
    if (to <= pos) continue;
    // Never a reply with a gap in it: an answer that skips bytes takes the general way (which
    // reports it as the error it is).
    if (e.offset > pos) return chainExtents(dev, offset, length, maxExtents, allocationFlags);
    const flags = e.allocated ? (e.data ? 0 : NBD_STATE_HOLE) | (e.zero ? NBD_STATE_ZERO : 0) : NBD_STATE_HOLE | NBD_STATE_ZERO;
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += to - pos;
    else {
      if (out.length === maxExtents) break;
      out.push({ offset: pos, length: to - pos, flags });
    }
    pos = to;
  }
  if (pos < end && out.length < maxExtents) return chainExtents(dev, offset, length, maxExtents, allocationFlags);
  return out;
}

/**
 * The qemu:allocation-depth view: 0 where no image of the chain allocates the range, 1 where the
 * top image does, n where the n-th image down does (as qemu-nbd -A reports it). Past the end of a
 * shorter backing image QEMU reports that image's depth (it "allocates" the zeros read there).
 */
export function allocationDepthExtents(dev: BlockDevice, offset: number, length: number, maxExtents = Number.MAX_SAFE_INTEGER): Promise<AllocationExtent[]> {
  return chainExtents(dev, offset, length, maxExtents, (e) => (e.present ? e.depth + 1 : e.pastBackingEnd ? e.depth + 2 : 0));
}

/** Extents of the chain's status over the range, each given the value `flagsOf` finds for it. */
async function chainExtents(dev: BlockDevice, offset: number, length: number, maxExtents: number, flagsOf: (e: ChainExtent) => number): Promise<AllocationExtent[]> {
  const end = offset + length;
  const status = new ChainStatus(new ClippedDevice(dev, end));
  const out: AllocationExtent[] = [];
  for (let pos = offset; pos < end; ) {
    const e = await status.at(pos, end - pos);
    const flags = flagsOf(e);
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += e.length;
    else {
      if (out.length === maxExtents) break;
      out.push({ offset: pos, length: e.length, flags });
    }
    pos += e.length;
  }
  return out;
}

/** A device whose block status never looks past `end`; everything else is the device itself. */
class ClippedDevice implements BlockDevice {
  constructor(
    private readonly inner: BlockDevice,
    private readonly end: number,
  ) {}

  get format(): string {
    return this.inner.format;
  }
  get filename(): string {
    return this.inner.filename;
  }
  get size(): number {
    return this.inner.size;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get clusterSize(): number {
    return this.inner.clusterSize;
  }
  get store(): ByteStore {
    return this.inner.store;
  }
  get backing(): BlockDevice | null {
    return this.inner.backing && new ClippedDevice(this.inner.backing, this.end);
  }

  blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return this.inner.blockStatus(offset, Math.max(1, Math.min(length, this.end - offset)));
  }
  read(offset: number, into: Uint8Array): Promise<void> {
    return this.inner.read(offset, into);
  }
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.inner.write(offset, data, options);
  }
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, options);
  }
  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  describe(): Promise<ImageDescription> {
    return this.inner.describe();
  }
  /** The view does not own the device: closing it is for the device's owner. */
  async close(): Promise<void> {}
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
