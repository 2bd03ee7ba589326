/**
 * Where a qcow (version 1) image puts new bytes. The format has no refcounts and QEMU never reuses
 * space in it: clusters and L2 tables are taken at the end of the file, cluster-aligned, and
 * compressed clusters right after the last byte on a sector boundary. Two refinements of ours,
 * invisible in the file's layout rules:
 *   - the padding skipped to cluster-align an allocation after a compressed cluster is kept as a
 *     gap, and later compressed clusters go there (with parallel writers, as in convert -c, normal
 *     and compressed clusters interleave and the padding would otherwise add up);
 *   - compressed clusters taken at the end are gathered in memory (the tail) and written in one go,
 *     since one write per few-hundred-byte cluster costs more than compressing it. Until the tail
 *     is written, readers take those bytes from here (readTail).
 */
import { alignUp } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';

const SECTOR = 512;
/** Compressed bytes gathered before they are written. */
const TAIL_BYTES = 1 << 20;
/** Gaps remembered for compressed clusters. */
const MAX_GAPS = 1024;

export class FileSpace {
  /** Where the next allocation goes from: the file's length as we have grown it. */
  private eof: number;
  private gaps: { start: number; end: number }[] = [];
  private tail: { start: number; length: number; buf: Uint8Array } | null = null;

  constructor(
    private readonly store: ByteStore,
    eof: number,
    private readonly clusterSize: number,
  ) {
    this.eof = eof;
  }

  /** One past the last byte handed out (or in the file when opened). */
  get end(): number {
    return this.eof;
  }

  /** `length` bytes at the cluster-aligned end of the file (a cluster, or an L2 table). */
  takeAligned(length: number): number {
    const start = alignUp(this.eof, SECTOR);
    const at = alignUp(this.eof, this.clusterSize);
    if (at > start) {
      this.gaps.push({ start, end: at });
      if (this.gaps.length > MAX_GAPS) this.gaps.shift();
    }
    this.eof = at + length;
    return at;
  }

  /** A sector-aligned place for `length` compressed bytes in a gap, or undefined. */
  takeGap(length: number): number | undefined {
    for (let i = 0; i < this.gaps.length; i++) {
      const g = this.gaps[i]!;
      if (g.start + length > g.end) continue;
      const at = g.start;
      g.start = alignUp(at + length, SECTOR);
      if (g.start >= g.end) this.gaps.splice(i, 1);
      return at;
    }
    return undefined;
  }

  /**
   * Place compressed bytes right after the last byte, sector-aligned, as QEMU puts them, holding
   * them in the tail until writeTail. Returns where they go.
   */
  async appendCompressed(bytes: Uint8Array): Promise<number> {
    const host = alignUp(this.eof, SECTOR);
    this.eof = host + bytes.length;
    let t = this.tail;
    // Only bytes that follow on (up to a sector's padding) join the tail: it must never span
    // space allocated to anything else.
    if (!t || host !== alignUp(t.start + t.length, SECTOR) || host - t.start + bytes.length > t.buf.length) {
      await this.writeTail();
      t = this.tail = { start: host, length: 0, buf: new Uint8Array(Math.max(TAIL_BYTES, bytes.length)) };
    }
    t.buf.set(bytes, host - t.start);
    t.length = host - t.start + bytes.length;
    return host;
  }

  /** Copy [host, +into.length) from the unwritten tail; false when the bytes are not (all) there. */
  readTail(host: number, into: Uint8Array): boolean {
    const t = this.tail;
    if (!t || host < t.start || host + into.length > t.start + t.length) return false;
    into.set(t.buf.subarray(host - t.start, host - t.start + into.length));
    return true;
  }

  /** Write the gathered compressed bytes. */
  async writeTail(): Promise<void> {
    const t = this.tail;
    if (!t) return;
    await this.store.write(t.start, t.buf.subarray(0, t.length));
    this.tail = null; // only now: readers take the bytes from memory until they are in the file
  }

  /** Forget everything handed out: the file now ends at `end` (the image was emptied). */
  reset(end: number): void {
    this.eof = end;
    this.gaps = [];
    this.tail = null;
  }
}
