/**
 * Allocation across a whole backing chain, as `qemu-img map` reports it: for each range, the
 * depth of the first layer that decides its content, whether anything in the chain does
 * (present), and whether it reads as zeros. Layers are queried in windows and their answers kept
 * until passed, so walking a large sparse image costs a handful of calls per layer.
 */
import type { BlockDevice, BlockExtent } from '../core/block-device.js';
import { chainOf } from '../chain/open.js';

/** One run of guest bytes with the same status across the whole chain: an entry of `qemu-img map --output=json`. */
export interface ChainExtent {
  /** Guest offset where the run starts, in bytes. */
  start: number;
  /** Length of the run in bytes. */
  length: number;
  /** The layer that decides the content, 0 being the top image; for an absent run, the deepest layer asked. */
  depth: number;
  /** Some layer of the chain allocates the run; false: it reads as zeros from nothing. */
  present: boolean;
  /** The run reads as zeros. */
  zero: boolean;
  /** The deciding layer stores bytes for the run (qemu's "data"). */
  data: boolean;
  /** Where the run's bytes sit in `filename`, as plain bytes, when they do (qemu's "offset"). */
  offset?: number;
  /** The file that `offset` points into. */
  filename?: string;
  /** The run is stored compressed. */
  compressed?: boolean;
  /**
   * Absent because the image below `depth` ends before this range. It reads as zeros; QEMU's
   * allocation-depth counts it as allocated in that shorter image (qemu-nbd -A).
   */
  pastBackingEnd?: boolean;
}

/**
 * How much of a layer one blockStatus call asks about. The window grows while the answers stay
 * short (a sparse image: 4 TiB in a few calls, not 4096), falls back to at most 1 GiB as soon as
 * an answer is not, and shrinks while answers are very long, so the extents held stay few
 * whatever the image.
 *
 * The first call asks for 64 MiB only: a convert plans its first item from it, and nothing is
 * read or written until that call returns. Asking 1 GiB first meant walking every L2 table of
 * every layer of a 512 MiB chain (32 table slices read, 24k entries decoded) before the first
 * data read; the rest is now asked while the first items are copied.
 */
const FIRST_WINDOW = 2 ** 26;
const WINDOW = 2 ** 30;
const MAX_WINDOW = 2 ** 44;
const SHORT_ANSWER = 64;
/**
 * An answer longer than this shrinks the window (to a quarter, down to MIN_WINDOW): a layer whose
 * allocation changes every few clusters (4 KiB clusters, a third of them written at random)
 * answered a 1 GiB window with ~100k extents, held until passed. They outlived the young
 * generation's collections, which copied and then promoted them: ~360M instructions of
 * scavenging in a 256 MiB convert of such a chain (callgrind), against objects that die young
 * when the answers stay a few thousand long.
 */
const LONG_ANSWER = 4096;
const MIN_WINDOW = 2 ** 23;

class LayerCursor {
  private cache: BlockExtent[] = [];
  /** Index of the first cached extent not yet passed: callers move forward, so this only grows. */
  private pos = 0;
  private window = FIRST_WINDOW;
  /** The layer's size, read once (every span asks it of every layer it reaches). */
  readonly size: number;
  constructor(readonly dev: BlockDevice) {
    this.size = dev.size;
  }

  /** The cached extent covering `offset`, if the last answer covers it (no await: most calls). */
  peek(offset: number): BlockExtent | undefined {
    return this.find(offset);
  }

  async at(offset: number): Promise<BlockExtent> {
    let hit = this.find(offset);
    if (!hit) {
      const len = Math.min(this.window, this.size - offset);
      this.cache = await this.dev.blockStatus(offset, len);
      const n = this.cache.length;
      if (n <= SHORT_ANSWER) this.window = Math.min(MAX_WINDOW, this.window * 4);
      else if (n > LONG_ANSWER) this.window = Math.max(MIN_WINDOW, this.window / 4);
      else this.window = Math.min(this.window, WINDOW);
      this.pos = 0;
      hit = this.find(offset);
      if (!hit) throw new Error(`block status of ${this.dev.filename} did not cover offset ${offset}`);
    }
    return hit;
  }

  private find(offset: number): BlockExtent | undefined {
    const cache = this.cache;
    let pos = this.pos;
    let e = cache[pos];
    while (e !== undefined && e.offset + e.length <= offset) e = cache[++pos];
    this.pos = pos;
    return e !== undefined && e.offset <= offset ? e : undefined;
  }
}

export class ChainStatus {
  private readonly layers: LayerCursor[];
  readonly size: number;

  /**
   * `layers`: how many images of the chain, from the top, to ask (default: all). A range none of
   * them allocates reads as absent, whatever the images below hold: commit asks only the layers
   * above its base, and walking the base's own tables would be wasted work.
   */
  constructor(top: BlockDevice, layers?: number) {
    this.layers = chainOf(top)
      .slice(0, layers)
      .map((d) => new LayerCursor(d));
    this.size = top.size;
  }

  /** The status of the longest run starting at `offset`, at most `maxLength` bytes. */
  async at(offset: number, maxLength: number): Promise<ChainExtent> {
    const now = this.atNow(offset, maxLength);
    if (now) return now;
    // Some layer must be asked first: each, from the top, to the first that decides the range.
    for (let depth = 0; depth < this.layers.length; depth++) {
      const layer = this.layers[depth]!;
      if (offset >= layer.size) break;
      const e = layer.peek(offset) ?? (await layer.at(offset));
      if (e.allocated) break;
    }
    return this.atNow(offset, maxLength)!;
  }

  /**
   * at()'s answer when every layer it needs has its extent cached (most calls: a walk asks each
   * layer once per window), else undefined. A convert's planner asks this per span: an awaited
   * at() per span (an async frame, a promise and a resumption of the planner's generator, in code
   * a short process mostly runs unoptimised) cost more than the status itself.
   */
  atNow(offset: number, maxLength: number): ChainExtent | undefined {
    let length = Math.min(maxLength, this.size - offset);
    // Where nothing in the chain decides a range, qemu-img still shows the host offset the
    // deepest layer reported (e.g. an extended-L2 cluster whose subclusters are unallocated).
    let deepest: BlockExtent | undefined;
    let deepestLayer: LayerCursor | undefined;
    const layers = this.layers;
    for (let depth = 0; depth < layers.length; depth++) {
      const layer = layers[depth]!;
      if (offset >= layer.size) {
        const out = absent(offset, length, depth - 1, deepest, deepestLayer?.dev);
        out.pastBackingEnd = true;
        return out;
      }
      // The backing layer only covers up to its own size.
      if (layer.size - offset < length) length = layer.size - offset;
      const e = layer.peek(offset);
      if (e === undefined) return undefined;
      const left = e.offset + e.length - offset;
      if (left < length) length = left;
      deepest = e;
      deepestLayer = layer;
      if (e.allocated) {
        const out: ChainExtent = { start: offset, length, depth, present: true, zero: e.zero, data: e.data };
        if (e.hostOffset !== undefined) {
          out.offset = e.hostOffset + (offset - e.offset);
          out.filename = e.hostFile ?? layer.dev.filename;
        }
        if (e.compressed) out.compressed = true;
        return out;
      }
    }
    return absent(offset, length, layers.length - 1, deepest, deepestLayer?.dev);
  }
}

/** A run no layer above `depth` decides; `deepest` is the extent the layer at `depth` reported. */
function absent(offset: number, length: number, depth: number, deepest: BlockExtent | undefined, dev: BlockDevice | undefined): ChainExtent {
  const out: ChainExtent = { start: offset, length, depth, present: false, zero: !deepest?.zeroUnknown, data: false };
  if (deepest && deepest.hostOffset !== undefined) {
    out.offset = deepest.hostOffset + (offset - deepest.offset);
    out.filename = deepest.hostFile ?? dev!.filename;
  }
  return out;
}

/**
 * Every extent of the chain from `start` to `end`, merged as qemu-img map merges them.
 *
 * @example
 * ```ts
 * import { openImage, mapChain } from 'qcow/node';
 *
 * await using dev = await openImage('top.qcow2', { readOnly: true });
 * for await (const e of mapChain(dev)) if (e.data) console.log(e.start, e.length, 'in layer', e.depth);
 * ```
 */
export async function* mapChain(top: BlockDevice, start = 0, end = top.size, signal?: AbortSignal): AsyncGenerator<ChainExtent> {
  const status = new ChainStatus(top);
  let pending: ChainExtent | undefined;
  for (let off = start; off < end; ) {
    signal?.throwIfAborted();
    const e = status.atNow(off, end - off) ?? (await status.at(off, end - off));
    off += e.length;
    if (pending && canMerge(pending, e)) {
      pending.length += e.length;
      continue;
    }
    if (pending) yield pending;
    pending = e;
  }
  if (pending) yield pending;
}

function canMerge(a: ChainExtent, b: ChainExtent): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  if (!!a.compressed !== !!b.compressed) return false;
  return a.offset === undefined || (a.offset + a.length === b.offset && a.filename === b.filename);
}
