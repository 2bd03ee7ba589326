/**
 * The native compare loop of `qemu-img compare` (native/compare_loop.c, through the host addon's
 * compareExtents): one call on libuv's thread pool per item of up to {@link ITEM} bytes reads both
 * sides' bytes into the caller's buffers piece by piece and compares them there, so no buffer and
 * no promise per read passes through JavaScript: of a 1 GiB comparison, that was most of our user
 * time (see docs/performance.md, cmp16).
 *
 * It takes only ranges whose data is plain bytes of local files on both sides (raw images,
 * qcow2's normal clusters, in any layer of a chain) or zeros. Anything else (compressed or
 * encrypted clusters, stores without a descriptor: memory, HTTP, NBD, the browser) goes
 * compare.ts's TypeScript way, which finds the same first difference.
 */
import type { BlockDevice } from '../core/block-device.js';
import type { ByteStore } from '../storage/types.js';
import { nativeCompareExtents, type CompareExtents } from '#host-copy';
import type { ChainExtent } from './chain-status.js';

/** The largest item handed to one call: few calls per GiB, and the extents of one stay few. */
export const ITEM = 64 * 1024 * 1024;

/** One side of the comparison: its chain's layers and the extents of the item in hand. */
class Side {
  extents = new Float64Array(3 * 16);
  count = 0;
  private readonly layers: BlockDevice[] = [];

  constructor(top: BlockDevice) {
    for (let d: BlockDevice | null = top; d; d = d.backing) this.layers.push(d);
  }

  private push(fd: number, at: number, length: number): void {
    if (3 * this.count + 3 > this.extents.length) {
      const more = new Float64Array(this.extents.length * 2);
      more.set(this.extents);
      this.extents = more;
    }
    this.extents[3 * this.count] = fd;
    this.extents[3 * this.count + 1] = at;
    this.extents[3 * this.count + 2] = length;
    this.count++;
  }

  /**
   * Put where [offset, offset + length) of the side lies into `extents`, `e` being its chain
   * status there (at least `length` long): 'placed', 'later' (this range cannot be: compressed,
   * or not known to read as zeros; the TypeScript way reads it) or 'never' (the layer's data is
   * not plain bytes of a local file, and no range of it will be).
   */
  async place(offset: number, length: number, e: ChainExtent): Promise<'placed' | 'later' | 'never'> {
    this.count = 0;
    if (!e.present || e.zero) {
      if (!e.zero) return 'later';
      this.push(-1, 0, length);
      return 'placed';
    }
    if (e.compressed) return 'later';
    const layer = this.layers[e.depth];
    if (!layer?.plainExtents) return 'never';
    // Most ranges are one run the layer can place from what it holds now, without a promise.
    const now = layer.plainRunNow?.(offset, length);
    if (now) return this.take(now.store, now.hostOffset, length) ? 'placed' : 'never';
    let covered = 0;
    for (const p of await layer.plainExtents(offset, length)) {
      if (!p.store || p.hostOffset === undefined || p.offset !== offset + covered) return 'never';
      if (!this.take(p.store, p.hostOffset, p.length)) return 'never';
      covered += p.length;
    }
    return covered === length ? 'placed' : 'later';
  }

  private take(store: ByteStore, at: number, length: number): boolean {
    const fd = store.directFd?.(false);
    if (fd === undefined) return false;
    this.push(fd, at, length);
    return true;
  }
}

/** The loop for one comparison of two images. */
export class NativeCompare {
  private readonly a: Side;
  private readonly b: Side;
  /** Set once a side's data turned out not to be plain bytes of a file: no more tries. */
  private off = false;

  private constructor(
    private readonly run: CompareExtents,
    a: BlockDevice,
    b: BlockDevice,
  ) {
    this.a = new Side(a);
    this.b = new Side(b);
  }

  /** The loop for `a` against `b`, or undefined without the addon (or with QCOW_NO_NATIVE=1). */
  static for(a: BlockDevice, b: BlockDevice): NativeCompare | undefined {
    const run = nativeCompareExtents();
    return run ? new NativeCompare(run, a, b) : undefined;
  }

  /**
   * Compare [offset, offset + length) of the two images, `ea` and `eb` being their chain status
   * there, through `bufA` and `bufB` in pieces of `piece` bytes: the offset in the range of the
   * first byte that differs, -1 when none does, or undefined when this range must go the
   * TypeScript way (a side that cannot be placed, or a read that failed: the TypeScript way reads
   * it again and reports the failure as it always does).
   */
  async compare(offset: number, length: number, ea: ChainExtent, eb: ChainExtent, bufA: Uint8Array, bufB: Uint8Array, piece: number): Promise<number | undefined> {
    if (this.off) return undefined;
    const [pa, pb] = [await this.a.place(offset, length, ea), await this.b.place(offset, length, eb)];
    if (pa === 'never' || pb === 'never') this.off = true;
    if (pa !== 'placed' || pb !== 'placed') return undefined;
    try {
      return await this.run(bufA, bufB, this.a.extents, this.a.count, this.b.extents, this.b.count, length, piece);
    } catch (e) {
      if (typeof (e as { code?: unknown })?.code !== 'string') throw e;
      this.off = true;
      return undefined;
    }
  }
}
