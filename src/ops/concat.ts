/**
 * Several images read back to back as one guest disk (`qemu-img convert A B C target` writes A,
 * then B, then C). Reads and chain status are split at the image boundaries, so a copy loop can
 * work in target offsets and never care where one source ends.
 */
import type { BlockDevice } from '../core/block-device.js';
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

  async read(offset: number, into: Uint8Array): Promise<void> {
    for (let done = 0; done < into.length; ) {
      const p = this.partAt(offset + done);
      const local = offset + done - p.start;
      const n = Math.min(into.length - done, p.dev.size - local);
      await p.dev.read(local, into.subarray(done, done + n));
      done += n;
    }
  }
}
