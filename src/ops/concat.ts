/**
 * Several images read back to back as one guest disk (`qemu-img convert A B C target` writes A,
 * then B, then C). Reads and chain status are split at the image boundaries, so a copy loop can
 * work in target offsets and never care where one source ends.
 */
import type { BlockDevice, PlainExtent } from '../core/block-device.js';
import type { ByteStore } from '../storage/types.js';
import { ChainStatus, type ChainExtent } from './chain-status.js';

export class ConcatSource {
  readonly size: number;
  private readonly parts: { dev: BlockDevice; start: number; status: ChainStatus }[] = [];

  constructor(sources: BlockDevice[]) {
    let start = 0;
    for (const dev of sources) {
      this.parts.push({ dev, start, status: new ChainStatus(dev) });
      start += dev.size;
    }
    this.size = start;
  }

  private partAt(offset: number) {
    // Few sources: a linear scan is fine.
    for (const p of this.parts) if (offset < p.start + p.dev.size) return p;
    throw new RangeError(`offset ${offset} is beyond the sources (${this.size} bytes)`);
  }

  /**
   * Status of the run starting at `offset` (at most `maxLength`, never past the end of one source),
   * with `start` in concatenated offsets. Callers walk forward: each source's cursor only moves on.
   */
  async status(offset: number, maxLength: number): Promise<ChainExtent> {
    const p = this.partAt(offset);
    const local = offset - p.start;
    const e = await p.status.at(local, Math.min(maxLength, p.dev.size - local));
    // A fresh object per call: it can take the concatenated offset itself.
    e.start = offset;
    return e;
  }

  /**
   * status()'s answer when the layers have it cached (ChainStatus.atNow), else undefined: then
   * ask status(). Walkers that take a span at a time ask this first, so most spans cost no await.
   */
  statusNow(offset: number, maxLength: number): ChainExtent | undefined {
    const p = this.partAt(offset);
    const local = offset - p.start;
    const e = p.status.atNow(local, Math.min(maxLength, p.dev.size - local));
    if (e !== undefined) e.start = offset;
    return e;
  }

  /**
   * Guest bytes at `offset`. With `depth` (a ChainExtent's, for a range whose status said that
   * layer decides it), straight from the layer `depth` below each source's top: the layers above
   * leave the range to it, so it reads the same, without each of them mapping the range and
   * handing it down (a chain convert's reads went through every layer's cluster map and
   * backing read). Where that layer is missing or shorter, from the top as usual.
   */
  read(offset: number, into: Uint8Array, depth = 0): Promise<void> {
    // The usual request lies within one source: the layer's own promise, with no async frame of
    // ours around it (a convert makes one per data span).
    if (into.length === 0) return Promise.resolve();
    let p: (typeof this.parts)[number];
    try {
      p = this.partAt(offset);
    } catch (e) {
      return Promise.reject(e);
    }
    const local = offset - p.start;
    if (local + into.length <= p.dev.size) {
      let layer: BlockDevice | null = p.dev;
      for (let d = 0; d < depth && layer; d++) layer = layer.backing;
      return (layer && local + into.length <= layer.size ? layer : p.dev).read(local, into);
    }
    return this.readAcross(offset, into, depth);
  }

  /** read() of a range over more than one source: piece by piece. */
  private async readAcross(offset: number, into: Uint8Array, depth: number): Promise<void> {
    for (let done = 0; done < into.length; ) {
      const p = this.partAt(offset + done);
      const local = offset + done - p.start;
      const n = Math.min(into.length - done, p.dev.size - local);
      let layer: BlockDevice | null = p.dev;
      for (let d = 0; d < depth && layer; d++) layer = layer.backing;
      await (layer && local + n <= layer.size ? layer : p.dev).read(local, into.subarray(done, done + n));
      done += n;
    }
  }

  /**
   * plainExtents' answer where the layer `depth` below the source's top can give it now, without
   * a promise (BlockDevice.plainRunNow: a raw file, a qcow2 layer whose L2 slices are cached):
   * `take` is told each run of plain bytes in order, and the result is true when they covered the
   * range. False as soon as one cannot be told so (the caller then asks plainExtents, and drops
   * what `take` was told) or `take` refuses one, and for a range over two sources. The range is
   * asked whole first, then in pieces of 512 clusters of the layer (one qcow2 L2 slice of standard
   * entries: the most plainRunNow answers for at once). The native copy loop asks this first for
   * each data span: an asynchronous plainExtents per span (a promise, a run list, an object per
   * run) was most of the JavaScript left per item.
   */
  plainRunsNow(offset: number, length: number, depth: number, take: (store: ByteStore, hostOffset: number, length: number) => boolean): boolean {
    let p: (typeof this.parts)[number] | undefined;
    for (const q of this.parts) {
      if (offset < q.start + q.dev.size) {
        p = q;
        break;
      }
    }
    const local = p ? offset - p.start : 0;
    let layer: BlockDevice | null = p && local + length <= p.dev.size ? p.dev : null;
    for (let d = 0; d < depth && layer; d++) layer = layer.backing;
    if (!layer?.plainRunNow || local + length > layer.size) return false;
    const whole = layer.plainRunNow(local, length);
    if (whole) return take(whole.store, whole.hostOffset, length);
    const piece = 512 * Math.max(512, layer.clusterSize);
    if (length <= piece) return false;
    for (let at = local; at < local + length; ) {
      const end = Math.min(local + length, at - (at % piece) + piece);
      const run = layer.plainRunNow(at, end - at);
      if (!run || !take(run.store, run.hostOffset, end - at)) return false;
      at = end;
    }
    return true;
  }

  /**
   * Where [offset, offset + length) sits as plain bytes in the layer `depth` below each source's
   * top (a ChainExtent's depth), in concatenated offsets. Runs the layer cannot place (or a layer
   * without copy offload) come back without a store: they are read.
   */
  async plainExtents(offset: number, length: number, depth: number): Promise<PlainExtent[]> {
    const out: PlainExtent[] = [];
    for (let done = 0; done < length; ) {
      const p = this.partAt(offset + done);
      const local = offset + done - p.start;
      const n = Math.min(length - done, p.dev.size - local);
      let layer: BlockDevice | null = p.dev;
      for (let d = 0; d < depth && layer; d++) layer = layer.backing;
      if (layer?.plainExtents && local + n <= layer.size) {
        for (const e of await layer.plainExtents(local, n)) out.push({ ...e, offset: e.offset + p.start });
      } else out.push({ offset: offset + done, length: n });
      done += n;
    }
    return out;
  }
}
