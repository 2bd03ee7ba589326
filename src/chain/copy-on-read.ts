/**
 * Copy-on-read (QEMU's `copy-on-read=on`, `qemu-io -C`, the `copy-on-read` filter driver): reads
 * through an image copy what its backing chain supplies into the image itself, so later reads no
 * longer need the backing files (a slow remote base, say, is fetched once).
 *
 * It is a filter over the top image, made only when asked for: an image opened without it reads
 * as before, with no check on its read path. QEMU's rules, kept here:
 * - A read is widened to whole clusters, so the copy allocates whole clusters and no later write
 *   has to fetch the rest of one from the backing chain.
 * - Only what the top image does not allocate itself is copied (a zero cluster or data there is
 *   never rewritten); it is read through the image (the chain below decides), in pieces of at most
 *   16 MiB, and written back as it is, or as a zero write when it reads as zeros (the image then
 *   keeps a zero flag, not a data cluster).
 * - Copying needs a writable image: opening read-only with copy-on-read is refused.
 * A copy and the guest writes that overlap it never interleave: both run under one lock (as do
 * compressed writes, resizes, snapshot reverts and backing changes), so a copy never puts old
 * backing data over a newer write.
 */
import type { BlockDevice, BlockExtent, ImageDescription, WriteOptions, ZeroOptions } from '../core/block-device.js';
import { firstNonZero } from '../core/bytes.js';
import { QcowError } from '../core/errors.js';
import { Mutex } from '../core/mutex.js';

/** QEMU's largest piece copied at once (MAX_BOUNCE_BUFFER: 32768 sectors). */
const COPY_PIECE = 16 * 1024 * 1024;

/** The methods a filter passes on to the image unchanged, where the image has them. */
const PASSED_ON = ['createSnapshot', 'deleteSnapshot', 'readVmState', 'writeVmState', 'persistentBitmaps', 'editBitmaps'] as const;

/**
 * Those passed on under the filter's lock: each changes what the guest reads (its data, its
 * size, its backing chain), so a copy must not read the old bytes before it and write them after.
 */
const PASSED_ON_LOCKED = ['writeCompressed', 'resize', 'setBacking', 'makeEmpty', 'applySnapshot', 'amend'] as const;

class CopyOnReadDevice implements BlockDevice {
  /** Copies and writes: a copy must not land over a write made while it read the backing data. */
  private readonly lock = new Mutex();

  constructor(private readonly inner: BlockDevice) {
    const self = this as unknown as Record<string, unknown>;
    const from = inner as unknown as Record<string, ((...a: unknown[]) => unknown) | undefined>;
    for (const m of PASSED_ON) {
      const f = from[m];
      if (typeof f === 'function') self[m] = f.bind(inner);
    }
    for (const m of PASSED_ON_LOCKED) {
      const f = from[m];
      if (typeof f === 'function') self[m] = (...a: unknown[]) => this.lock.run(async () => f.apply(inner, a));
    }
  }

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
  get backing(): BlockDevice | null {
    return this.inner.backing;
  }
  get store(): BlockDevice['store'] {
    return this.inner.store;
  }
  get unusable(): Error | undefined {
    return this.inner.unusable;
  }

  async read(offset: number, into: Uint8Array): Promise<void> {
    if (into.length === 0) return this.inner.read(offset, into);
    const { start, end } = this.clusters(offset, into.length);
    // Where the image holds all of it already (the common case once copied), a plain read. Not
    // while a copy of some of it is under way: the image links a copy's clusters before their
    // data lands, so they look allocated and would read as what the file held there before.
    const extents = await this.inner.blockStatus(start, end - start);
    if (extents.every((e) => e.allocated) && !this.copyOverlaps(start, end)) return this.inner.read(offset, into);
    return this.lock.run(() => this.copyingRead(offset, into));
  }

  /** Ranges (whole clusters) a copy is writing into the image now: set before its writes start, cleared once they have landed. */
  private readonly copying = new Set<{ start: number; end: number }>();

  private copyOverlaps(start: number, end: number): boolean {
    for (const c of this.copying) if (c.start < end && start < c.end) return true;
    return false;
  }

  private clusters(offset: number, length: number): { start: number; end: number } {
    const cs = this.inner.clusterSize;
    const start = offset - (offset % cs);
    return { start, end: Math.min(this.inner.size, Math.ceil((offset + length) / cs) * cs) };
  }

  private async copyingRead(offset: number, into: Uint8Array): Promise<void> {
    const { start, end } = this.clusters(offset, into.length);
    const range = { start, end };
    this.copying.add(range);
    try {
      await this.copyUnder(offset, into, start, end);
    } finally {
      this.copying.delete(range);
    }
  }

  private async copyUnder(offset: number, into: Uint8Array, start: number, end: number): Promise<void> {
    const wantEnd = offset + into.length;
    let bounce: Uint8Array | undefined;
    // Asked again under the lock: a write may have allocated some of it meanwhile.
    for (const e of await this.inner.blockStatus(start, end - start)) {
      const eEnd = e.offset + e.length;
      if (e.allocated) {
        const a = Math.max(e.offset, offset);
        const b = Math.min(eEnd, wantEnd);
        if (a < b) await this.inner.read(a, into.subarray(a - offset, b - offset));
        continue;
      }
      for (let p = e.offset; p < eEnd; ) {
        const n = Math.min(COPY_PIECE, eEnd - p);
        bounce ??= new Uint8Array(Math.min(COPY_PIECE, end - start));
        const piece = bounce.subarray(0, n);
        await this.inner.read(p, piece);
        await this.copyIn(p, piece);
        const a = Math.max(p, offset);
        const b = Math.min(p + n, wantEnd);
        if (a < b) into.set(piece.subarray(a - p, b - p), a - offset);
        p += n;
      }
    }
  }

  /** Write what was read through the image into the image itself (a zero write where it is all zeros). */
  private async copyIn(offset: number, piece: Uint8Array): Promise<void> {
    // blkdebug's cor_write event, for the image's node (QEMU raises it before each copy's write).
    this.inner.store.debugEvent?.('cor_write');
    if (firstNonZero(piece) === piece.length) await this.inner.writeZeroes(offset, piece.length);
    else await this.inner.write(offset, piece);
  }

  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.lock.run(() => this.inner.write(offset, data, options));
  }
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.lock.run(() => this.inner.writeZeroes(offset, length, options));
  }
  discard(offset: number, length: number): Promise<void> {
    return this.lock.run(() => this.inner.discard(offset, length));
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return this.inner.blockStatus(offset, length);
  }
  describe(): Promise<ImageDescription> {
    return this.inner.describe();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * `dev` with copy-on-read: reads copy what the backing chain supplies into `dev` (see above). The
 * filter owns `dev` and closes it with itself. `dev` must be writable (QCOW_READ_ONLY otherwise,
 * and `dev` is left open for the caller).
 *
 * @example
 * ```ts
 * import { withCopyOnRead } from 'qcow';
 * import { openImage } from 'qcow/node';
 *
 * const dev = withCopyOnRead(await openImage('overlay-of-remote.qcow2'));
 * await dev.read(0, new Uint8Array(65536)); // now held by overlay-of-remote.qcow2 itself
 * await dev.close();
 * ```
 */
export function withCopyOnRead(dev: BlockDevice): BlockDevice {
  if (dev.readOnly) throw new QcowError('QCOW_READ_ONLY', "Can't use copy-on-read on read-only device", { file: dev.filename });
  return new CopyOnReadDevice(dev);
}
