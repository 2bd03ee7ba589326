/**
 * Reading a damaged source as `qemu-img convert --salvage` does: a read or block-status query
 * that fails becomes a warning, and the copy goes on.
 *
 * - Block status that fails is asked again over shorter ranges (a quarter each time) from the
 *   same place, until the range is one 512-byte sector: that sector is then taken for data (read
 *   it, it may well read) and a warning names its offset. Each sector whose status cannot be had
 *   is so reported once per walk over the source.
 * - A read that fails is read again sector by sector; a sector that still fails reads as zeros,
 *   with a warning naming its offset.
 * Reads are asked of each source's top device (where a filter, a blkdebug rule or a failing disk
 * answers); a status below the top's (where it leaves a range to its backing chain) of the layers
 * below, a failure there salvaged as the top's. Sector by sector only where a larger request
 * failed, so an undamaged source costs what it costs without salvaging.
 */
import type { BlockDevice, BlockExtent } from '../core/block-device.js';
import type { ChainExtent } from './chain-status.js';
import { ConcatSource } from './concat.js';
import { CorruptionEvent } from '../core/errors.js';

const SECTOR = 512;
/** The longest range one block-status query asks about (QEMU's largest request, ~2 GiB). */
const QUERY_MAX = 2 ** 31 - SECTOR;

/**
 * The words of a failure, as QEMU's strerror gives them for an I/O error. A corruption event is
 * an EIO in QEMU (its own line, "qcow2: Image is corrupt: ...", has told what it is).
 */
function reason(e: unknown): string {
  if (e instanceof CorruptionEvent) return 'Input/output error';
  return e instanceof Error ? e.message : String(e);
}

export class SalvagingSource extends ConcatSource {
  private readonly tops: { dev: BlockDevice; start: number }[] = [];
  /** The last answer that succeeded, kept while the walk is inside it (the walk only moves on). */
  private cached: { dev: BlockDevice; from: number; to: number; extents: BlockExtent[] } | undefined;

  constructor(
    sources: BlockDevice[],
    /** Told each warning, in QEMU's words (without the program's prefix). */
    private readonly warn: (message: string) => void,
  ) {
    super(sources);
    let start = 0;
    for (const dev of sources) {
      this.tops.push({ dev, start });
      start += dev.size;
    }
  }

  private topAt(offset: number): { dev: BlockDevice; start: number } {
    for (const p of this.tops) if (offset < p.start + p.dev.size) return p;
    throw new RangeError(`offset ${offset} is beyond the sources (${this.size} bytes)`);
  }

  /**
   * Status of the run at `offset` as the whole chain decides it, asked of the source's top device.
   * Every run is reported at depth 0, so its data is read through the top (see read()).
   */
  override async status(offset: number, maxLength: number): Promise<ChainExtent> {
    const { dev, start } = this.topAt(offset);
    const local = offset - start;
    const limit = Math.min(maxLength, dev.size - local);
    // The status is the whole chain's (QEMU asks it of the top, above every backing layer): a
    // failure anywhere in it, the top's or a backing file's, is salvaged the same way.
    let n = Math.min(limit, QUERY_MAX);
    let out: ChainExtent;
    for (;;) {
      try {
        out = await chainExtent(dev, await this.topExtent(dev, local, n), local, n);
        break;
      } catch (e) {
        if (n <= SECTOR) {
          this.warn(`error while reading block status at offset ${local}: ${reason(e)}`);
          out = { start: offset, length: Math.min(SECTOR, limit), depth: 0, present: true, zero: false, data: true };
          break;
        }
        // A quarter of the range, in whole sectors, from the same place.
        n = Math.ceil(n / SECTOR / 4) * SECTOR;
      }
    }
    out.start = offset;
    out.depth = 0;
    return out;
  }

  /** Salvaging decides each run in status(), which may have to retry: never answered now. */
  override statusNow(): ChainExtent | undefined {
    return undefined;
  }

  /** The top device's extent at `local`, at most `limit` long (throws what the query throws). */
  private async topExtent(dev: BlockDevice, local: number, limit: number): Promise<BlockExtent> {
    const c = this.cached;
    if (c && c.dev === dev && local >= c.from && local < c.to) {
      const hit = c.extents.find((e) => e.offset <= local && local < e.offset + e.length);
      if (hit) return clip(hit, local, Math.min(limit, c.to - local));
    }
    const extents = await dev.blockStatus(local, limit);
    this.cached = { dev, from: local, to: local + limit, extents };
    return clip(extents[0]!, local, limit);
  }

  /** Guest bytes at `offset`, through each source's top; sectors that cannot be read are zeros (warned). */
  override async read(offset: number, into: Uint8Array): Promise<void> {
    try {
      await super.read(offset, into);
      return;
    } catch {
      // Sector by sector, below.
    }
    for (let done = 0; done < into.length; ) {
      const at = offset + done;
      const n = Math.min(SECTOR - (at % SECTOR), into.length - done);
      const piece = into.subarray(done, done + n);
      try {
        await super.read(at, piece);
      } catch (e) {
        this.warn(`error while reading offset ${at - this.topAt(at).start}: ${reason(e)}`);
        piece.fill(0);
      }
      done += n;
    }
  }
}

function clip(e: BlockExtent, offset: number, length: number): BlockExtent {
  const end = Math.min(e.offset + e.length, offset + length);
  return { ...e, offset, length: end - offset };
}

/** The chain's status of the top's extent `e` (at `local`): the top's own, or the backing chain's below it. */
async function chainExtent(dev: BlockDevice, e: BlockExtent, local: number, limit: number): Promise<ChainExtent> {
  let length = Math.min(e.length, limit);
  if (e.allocated) return { start: local, length, depth: 0, present: true, zero: e.zero, data: e.data };
  let depth = 0;
  for (let layer = dev.backing; layer; layer = layer.backing) {
    depth++;
    // Past the end of a shorter backing file: zeros.
    if (local >= layer.size) return { start: local, length, depth, present: false, zero: true, data: false };
    const below = (await layer.blockStatus(local, Math.min(length, layer.size - local)))[0]!;
    length = below.length;
    if (below.allocated) return { start: local, length, depth, present: true, zero: below.zero, data: below.data };
  }
  return { start: local, length, depth, present: false, zero: true, data: false };
}
