/**
 * Incremental backup without QEMU. A backup of a qcow2 disk that holds a persistent dirty bitmap
 * NAME is a new qcow2 image:
 *   - full (no `previous`): every byte of the disk, a standalone image;
 *   - incremental (`previous`: the last backup of the chain): only the ranges dirty in NAME, in an
 *     overlay whose backing file is `previous`, so `full <- inc1 <- inc2` reads exactly as the
 *     disk read at each backup.
 * Then the checkpoint rotates: NAME is cleared (or added, on the first full backup), so it
 * records the changes since this backup. The source is held open for writing throughout, which
 * takes its write lock: no other writer can change the disk between the copy and the rotation.
 * The bitmap is cleared only after the target is flushed and closed; a crash before that leaves
 * the bitmap dirty and the next backup copies those ranges again (more than needed, never less).
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { isZero } from '../core/bytes.js';
import { convert } from './convert.js';
import { changedRuns } from './changed-extents.js';
import { ChainStatus } from './chain-status.js';

/** Options of {@link backup}: the bitmap, how to make the target, and the previous backup. */
export interface BackupOptions {
  /** The persistent dirty bitmap that records changes between backups. */
  bitmap: string;
  /** Opens (creating first) the target image; `backing` names the previous backup. */
  createTarget: (size: number, backing?: { file: string; format: string }) => Promise<BlockDevice>;
  /** The previous backup of the chain, as the target's backing file name; absent: a full backup. */
  previous?: {
    /** The previous backup's file name, as the new image records it for its backing file. */
    file: string;
    /** The previous backup's format ("qcow2"). */
    format: string;
  };
  /** Leave the bitmap as it is (a trial run, or a backup out of the rotation). */
  keepBitmap?: boolean;
  /** Stops the operation between steps; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
  /** Called as data is copied: bytes done so far, out of the bytes to copy. */
  onProgress?: (done: number, total: number) => void;
}

/** What {@link backup} did. */
export interface BackupResult {
  /** A full backup (no `previous`) or an incremental one. */
  kind: 'full' | 'incremental';
  /** Guest bytes copied. */
  bytes: number;
}

const CHUNK = 1 << 20;
/** The most one zero write covers, so progress moves and an abort is seen on huge empty runs. */
const ZERO_STEP = 2 ** 30;

/**
 * Back up a qcow2 disk with a persistent dirty bitmap, without QEMU: a full backup copies every
 * byte into a new image; an incremental one copies only the ranges dirty in the bitmap, into an
 * overlay over `previous`. Then the bitmap is cleared (or added on the first full backup), so it
 * records changes from now on. The source must be opened writable (it keeps the write lock) and
 * stays open; the target is flushed and closed.
 *
 * @example
 * ```ts
 * import { openImage, createImage, backup } from 'qcow/node';
 *
 * await using disk = await openImage('vm.qcow2');
 * const createTarget = (file: string) => async (size: number, backing?: { file: string; format: string }) => {
 *   await createImage(file, { format: 'qcow2', size, backingFile: backing?.file, backingFormat: backing?.format });
 *   return openImage(file, { format: 'qcow2' });
 * };
 * await backup(disk, { bitmap: 'backup', createTarget: createTarget('full.qcow2') });
 * // Later: only what changed since, over the full backup.
 * await backup(disk, { bitmap: 'backup', createTarget: createTarget('inc1.qcow2'), previous: { file: 'full.qcow2', format: 'qcow2' } });
 * ```
 */
export async function backup(source: BlockDevice, options: BackupOptions): Promise<BackupResult> {
  if (!source.persistentBitmaps || !source.editBitmaps) throw new QcowError('QCOW_UNSUPPORTED', 'backups need a qcow2 source (persistent dirty bitmaps)', { file: source.filename });
  if (source.readOnly) throw new QcowError('QCOW_READ_ONLY', 'the source must be opened for writing: the backup rotates its bitmap', { file: source.filename });
  const bitmaps = await source.persistentBitmaps();
  const exists = bitmaps.list().some((b) => b.name === options.bitmap);
  if (options.previous && !exists) throw new QcowError('QCOW_INVALID_ARGUMENT', `Dirty bitmap '${options.bitmap}' not found: an incremental backup needs the bitmap of the previous one`);
  // The bitmap's runs are streamed, never listed (a fragmented bitmap over a large disk has
  // millions): a first pass sums them for the progress total, and fails early on an inconsistent
  // bitmap, which cannot say what changed, before the target exists.
  let total = 0;
  if (options.previous) {
    for await (const run of changedRuns(source, options.bitmap)) {
      throwIfAborted(options.signal);
      total += run.length;
    }
  }
  const target = await options.createTarget(source.size, options.previous);
  let bytes = 0;
  try {
    if (!options.previous) {
      await convert([source], target, { targetIsZero: true, signal: options.signal, onProgress: options.onProgress });
      bytes = source.size;
    } else {
      const progress = (n: number) => {
        bytes += n;
        options.onProgress?.(bytes, total);
      };
      // What the source's chain says reads as zeros is written as zeros without reading it, so a
      // dirty but empty stretch (a discard, a resize) costs metadata, not a scan of its bytes.
      const status = new ChainStatus(source);
      const buf = new Uint8Array(CHUNK);
      for await (const run of changedRuns(source, options.bitmap)) {
        const end = run.offset + run.length;
        for (let off = run.offset; off < end; ) {
          throwIfAborted(options.signal);
          const st = await status.at(off, Math.min(end - off, ZERO_STEP));
          const stEnd = off + st.length;
          // Zeros are written as zeros: the overlay must hide what the previous backup holds there.
          if (st.zero) {
            await target.writeZeroes(off, st.length);
            progress(st.length);
            off = stEnd;
            continue;
          }
          for (; off < stEnd; ) {
            throwIfAborted(options.signal);
            const part = buf.subarray(0, Math.min(CHUNK, stEnd - off));
            await source.read(off, part);
            if (isZero(part)) await target.writeZeroes(off, part.length);
            else await target.write(off, part);
            off += part.length;
            progress(part.length);
          }
        }
      }
    }
    await target.flush();
  } finally {
    await target.close();
  }
  if (!options.keepBitmap) {
    await source.editBitmaps(async (b) => {
      if (b.list().some((x) => x.name === options.bitmap)) await b.clear(options.bitmap);
      else await b.add(options.bitmap);
    });
  }
  return { kind: options.previous ? 'incremental' : 'full', bytes };
}
