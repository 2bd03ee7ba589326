/**
 * `qemu-img commit`: write what an overlay (and any images between it and the base) holds into a
 * base image of its backing chain, then empty the overlay so it reads through to the base again.
 *
 * qemu-img's rules, kept here:
 * - The base defaults to the overlay's backing file; with another base further down, the images in
 *   between no longer describe anything sensible afterwards, so the overlay is kept as it is (its
 *   content is still right) rather than emptied: committing deeper implies `drop`.
 * - A base smaller than the overlay grows to the overlay's size (never shrinks).
 * - Ranges a layer above the base marks as zero become zeros in the base, and so do ranges past
 *   the end of a shorter image between the overlay and the base; ranges nothing above the base
 *   allocates are left alone (never read).
 * - Emptying is the format's own operation (`makeEmpty`): a qcow2 overlay has its clusters
 *   deallocated, a qcow v1 overlay its tables cleared and file cut back, as QEMU does.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { chainOf } from '../chain/open.js';
import { ChainStatus } from './chain-status.js';
import { forEachPiece, type Range } from './copy-pool.js';

/** Options of {@link commit}. */
export interface CommitOptions {
  /** The image of the chain to write into (one of `chainOf(top)` below the top). Default: top.backing. */
  base?: BlockDevice;
  /** Leave the overlay as it is instead of emptying it (qemu-img -d). */
  drop?: boolean;
  /** Largest piece of data read and written at once, in bytes. Default 2 MiB. */
  chunkSize?: number;
  /** Pieces in flight at once (each holds one buffer of `chunkSize`). Default 4. */
  parallel?: number;
  /** Stops the operation between steps; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
  /** Called as the overlay is walked: guest bytes done so far, out of the overlay's size. */
  onProgress?: (done: number, total: number) => void;
}

/**
 * Write what `top` (and any image between it and the base) holds into `options.base` (its
 * backing image by default), then empty `top` so it reads through to the base again, as
 * `qemu-img commit` does. The base must be opened writable (`writableBacking` when opening).
 *
 * @example
 * ```ts
 * import { commit } from 'qcow';
 * import { openImage } from 'qcow/node';
 *
 * const top = await openImage('overlay.qcow2', { writableBacking: (_name, depth) => depth === 1 });
 * await commit(top);
 * await top.close();
 * ```
 */
export async function commit(top: BlockDevice, options: CommitOptions = {}): Promise<void> {
  const chain = chainOf(top);
  const base = options.base ?? top.backing;
  if (!base) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Image does not have a backing file', { file: top.filename });
  const baseDepth = chain.indexOf(base);
  if (baseDepth <= 0) throw new QcowError('QCOW_INVALID_ARGUMENT', `'${base.filename}' is not in the backing chain of '${top.filename}'`);
  const drop = !!options.drop || baseDepth > 1;
  if (base.readOnly) throw new QcowError('QCOW_READ_ONLY', 'the base image is opened read-only', { file: base.filename });
  if (!drop) {
    if (!top.makeEmpty) throw new QcowError('QCOW_UNSUPPORTED', `the ${top.format} format cannot empty an image after commit (use -d)`, { file: top.filename });
    if (top.readOnly) throw new QcowError('QCOW_READ_ONLY', 'image is opened read-only', { file: top.filename });
  }
  if (base.size < top.size) {
    if (!base.resize) throw new QcowError('QCOW_UNSUPPORTED', `the ${base.format} format cannot grow the base image to the overlay's size`, { file: base.filename });
    await base.resize(top.size);
  }

  const total = top.size;
  let done = 0;
  const progress = (n: number) => {
    done += n;
    options.onProgress?.(done, total);
  };
  // Only the layers above the base decide what is copied: the base's own allocation is not asked.
  const status = new ChainStatus(top, baseDepth);
  // Walk the chain's allocation once: zero ranges are written at once (no buffer), data ranges
  // handed to the pool.
  async function* dataRanges(): AsyncGenerator<Range> {
    for (let off = 0; off < total; ) {
      throwIfAborted(options.signal);
      const e = await status.at(off, total - off);
      const above = e.present && e.depth < baseDepth;
      // pastBackingEnd: an image between the overlay and the base ends before this range, so the
      // overlay reads zeros there whatever the base holds; QEMU counts the range as allocated
      // (as zeros) in that shorter image, and commits the zeros.
      if ((above && e.zero) || e.pastBackingEnd) {
        // As qemu-img commit (an active commit: a mirror job with unmap on): the base may drop
        // its clusters there rather than keep them allocated as zeros.
        await base!.writeZeroes(off, e.length, { mayUnmap: true });
        progress(e.length);
      } else if (above) yield { offset: off, length: e.length };
      else progress(e.length);
      off += e.length;
    }
  }
  try {
    await copy();
  } catch (e) {
    throw copyFailure(e);
  }
  if (!drop) {
    try {
      await top.makeEmpty!();
      await top.flush();
    } catch (e) {
      throw emptyFailure(e, top.filename);
    }
  }

  async function copy(): Promise<void> {
    await forEachPiece(
      dataRanges(),
      options.chunkSize ?? 2 * 1024 * 1024,
      options.parallel ?? 4,
      async (piece, buffer) => {
        const buf = buffer.subarray(0, piece.length);
        await top.read(piece.offset, buf);
        throwIfAborted(options.signal);
        await base!.write(piece.offset, buf);
        progress(piece.length);
      },
      options.signal,
    );
    await base!.flush();
  }
}

/**
 * A storage failure while the data was copied: said to be the commit's (qemu-img reports it as
 * its block job's failure). The image is left as it was: the base may hold part of the data.
 */
function copyFailure(e: unknown): unknown {
  if (e instanceof QcowError && e.code !== 'QCOW_IO') return e;
  const message = e instanceof Error ? e.message : String(e);
  return new QcowError('QCOW_IO', `commit failed: ${message}`, { cause: e, file: (e as QcowError).file, errno: (e as QcowError).errno });
}

/**
 * A failure while the overlay was emptied: the data is in the base by then, but the overlay may
 * still hold some of it (or, for a qcow2 image emptied all at once, be left dirty for the next
 * open's repair), so the message names the overlay.
 */
function emptyFailure(e: unknown, name: string): unknown {
  if (!(e instanceof QcowError) || e.code === 'QCOW_ABORTED') return e;
  return new QcowError(e.code, `Failed to empty ${name}: ${e.message}`, { cause: e, file: e.file, errno: e.errno });
}
