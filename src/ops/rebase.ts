/**
 * `qemu-img rebase`: make an image name another backing file (or none) without changing what the
 * guest reads (safe mode), or only rewrite the name (unsafe, -u).
 *
 * Safe mode compares, everywhere the image itself does not decide the content, what the old
 * backing chain reads with what the new one reads, and writes the old bytes into the image where
 * they differ, in runs of whole 512-byte sectors as qemu-img does. Ranges both chains read as
 * zeros are never read; when the new backing file is itself part of the old chain, ranges that
 * nothing above it allocates are the same in both and skipped too. Only then is the header
 * rewritten, so an interrupted rebase leaves the image naming its old backing file, with content
 * unchanged.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { chainOf } from '../chain/open.js';
import { ChainStatus } from './chain-status.js';
import { forEachPiece, type Range } from './copy-pool.js';
import { sameBytes } from './zero-scan.js';

/** Options of {@link rebase}. */
export interface RebaseOptions {
  /** The new backing chain, opened read-only (null: none, the image becomes self-contained). Unused with `unsafe`. */
  newBacking: BlockDevice | null;
  /** What the header will say: the name as the user wrote it (relative to the image); null for none. */
  backingName: string | null;
  /** The new backing file's format, as the header will record it; null for none. */
  backingFormat: string | null;
  /** Only rewrite the header (qemu-img -u). */
  unsafe?: boolean;
  /** Largest piece compared and copied at once, in bytes. Default 2 MiB. */
  chunkSize?: number;
  /** Pieces read at once (each holds buffers of `chunkSize`). Default 4. */
  parallel?: number;
  /** Stops the operation between steps; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
  /** Called as the image is walked: guest bytes done so far, out of its size. */
  onProgress?: (done: number, total: number) => void;
}

const SECTOR = 512;

/**
 * Make `image` (opened writable, with its old backing chain) name another backing file, or none,
 * as `qemu-img rebase` does: safe mode first copies into the image every range where the old
 * and the new chain read differently, so the guest reads the same afterwards; `unsafe` only
 * rewrites the header.
 *
 * @example
 * ```ts
 * import { rebase } from 'qcow';
 * import { openImage } from 'qcow/node';
 *
 * const image = await openImage('overlay.qcow2');
 * const newBacking = await openImage('new-base.qcow2', { readOnly: true });
 * await rebase(image, { newBacking, backingName: 'new-base.qcow2', backingFormat: 'qcow2' });
 * await newBacking.close();
 * await image.close();
 * ```
 */
export async function rebase(image: BlockDevice, options: RebaseOptions): Promise<void> {
  if (!image.setBacking) throw new QcowError('QCOW_UNSUPPORTED', `the ${image.format} format cannot change its backing file`, { file: image.filename });
  if (image.readOnly) throw new QcowError('QCOW_READ_ONLY', 'image is opened read-only', { file: image.filename });
  if (!options.unsafe) await copyDifferences(image, options);
  await image.setBacking(options.backingName, options.backingFormat);
  await image.flush();
  options.onProgress?.(image.size, image.size);
}

async function copyDifferences(image: BlockDevice, options: RebaseOptions): Promise<void> {
  const oldChain = image.backing;
  const newChain = options.newBacking;
  const total = image.size;
  let done = 0;
  const progress = (n: number) => {
    done += n;
    options.onProgress?.(done, total);
  };
  // Where the new backing file sits in the old chain, if it does: below that depth both agree.
  const shared = oldChain && newChain ? chainOf(oldChain).findIndex((d) => d.filename === newChain.filename) : -1;

  // The image's own allocation only (its backing chain is asked through oldStatus below).
  const topStatus = new ChainStatus(image, 1);
  const oldStatus = oldChain ? new ChainStatus(oldChain) : undefined;
  const newStatus = newChain ? new ChainStatus(newChain) : undefined;
  /** Does a chain read zeros over [off, +len) for sure? Returns the length that answer holds for. */
  const zeroRun = async (status: ChainStatus | undefined, dev: BlockDevice | null, off: number, len: number) => {
    if (!status || !dev || off >= dev.size) return { zero: true, length: len, depth: -1 };
    const e = await status.at(off, Math.min(len, dev.size - off));
    return { zero: !e.present || e.zero, length: e.length, depth: e.present ? e.depth : -1 };
  };

  async function* candidates(): AsyncGenerator<Range> {
    for (let off = 0; off < total; ) {
      throwIfAborted(options.signal);
      const t = await topStatus.at(off, total - off);
      if (t.present && t.depth === 0) {
        // The image decides these bytes itself: nothing to carry over.
        progress(t.length);
        off += t.length;
        continue;
      }
      const o = await zeroRun(oldStatus, oldChain, off, t.length);
      const n = await zeroRun(newStatus, newChain, off, o.length);
      const len = n.length;
      // Same content when both read zeros, or when the old chain's deciding layer is the new
      // backing file or one below it (the new chain is that tail of the old one).
      const same = (o.zero && n.zero) || (shared >= 0 && o.depth >= shared);
      if (same) progress(len);
      else yield { offset: off, length: len };
      off += len;
    }
  }

  const chunk = options.chunkSize ?? 2 * 1024 * 1024;
  const oldEnd = oldChain?.size ?? 0;
  // Pieces are read in parallel but written in guest order, one after another, as qemu-img
  // rebase writes them: the clusters the image allocates then land in the same order every run.
  let lastWrite: Promise<void> = Promise.resolve();
  await forEachPiece(
    candidates(),
    chunk,
    options.parallel ?? 4,
    async (piece, buffer) => {
      // Steps start in piece order (forEachPiece hands pieces out in order), so this is our turn.
      const previous = lastWrite;
      let done!: () => void;
      lastWrite = new Promise<void>((resolve) => (done = resolve));
      try {
        await writePiece(piece, buffer, previous);
      } finally {
        done();
      }
    },
    options.signal,
    2 * chunk,
  );

  // As qemu-img rebase (7.2): the old bytes are written as data, zeros or not, except past the
  // end of the old backing file, where they are zeros by definition and written as zeroes.
  async function writeBack(at: number, run: Uint8Array): Promise<void> {
    const split = Math.min(run.length, Math.max(0, oldEnd - at));
    if (split > 0) await image.write(at, run.subarray(0, split));
    if (split < run.length) await image.writeZeroes(at + split, run.length - split);
  }

  async function writePiece(piece: Range, buffer: Uint8Array, turn: Promise<void>): Promise<void> {
    const oldBuf = buffer.subarray(0, piece.length);
    const newBuf = buffer.subarray(chunk, chunk + piece.length);
    await Promise.all([readChain(oldChain, piece.offset, oldBuf), readChain(newChain, piece.offset, newBuf)]);
    await turn;
    throwIfAborted(options.signal);
    // Write back the old bytes in runs of differing sectors.
    let runStart = -1;
    for (let s = 0; s <= piece.length; s += SECTOR) {
      const differs = s < piece.length && !sameBytes(oldBuf.subarray(s, s + SECTOR), newBuf.subarray(s, s + SECTOR));
      if (differs && runStart < 0) runStart = s;
      else if (!differs && runStart >= 0) {
        await writeBack(piece.offset + runStart, oldBuf.subarray(runStart, Math.min(s, piece.length)));
        runStart = -1;
      }
    }
    progress(piece.length);
  }
}

/** Guest bytes of a chain, zeros past its end or without one. */
async function readChain(dev: BlockDevice | null, offset: number, into: Uint8Array): Promise<void> {
  const n = dev ? Math.max(0, Math.min(into.length, dev.size - offset)) : 0;
  if (n > 0) await dev!.read(offset, into.subarray(0, n));
  into.fill(0, n);
}
