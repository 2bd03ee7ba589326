/**
 * What changed since a checkpoint: the dirty runs of a persistent dirty bitmap, for backup tools
 * written in TypeScript (the same answer `qcow serve -B NAME` gives over NBD as the
 * qemu:dirty-bitmap:NAME context). Any device with persistent bitmaps (`persistentBitmaps`:
 * qcow2) answers.
 *
 * bitmapRuns and changedRuns stream the runs, holding one at a time: use them over whole large
 * disks. bitmapExtents and changedExtents collect them into an array, one entry per run (a 4 TiB
 * disk whose bitmap alternates at 64 KiB has 32 million): for bounded ranges.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, unsupported } from '../core/errors.js';
import type { DirtyExtent } from '../core/bitmaps.js';

export type { DirtyExtent };

/** The part of the disk to ask about; the whole disk by default. */
export interface ExtentRange {
  /** Guest offset to start at; 0 when absent. */
  offset?: number;
  /** Bytes from `offset`; to the end of the disk when absent. */
  length?: number;
}

/**
 * Every run of [offset, offset + length) of persistent bitmap `bitmapName`, dirty or clean, in
 * order and merged, one at a time: memory stays bounded whatever the disk and the bitmap.
 * QCOW_UNSUPPORTED for formats without persistent bitmaps. The checks (format, range, a bitmap that exists and is
 * consistent) run before the first run is produced.
 *
 * @example
 * ```ts
 * for await (const run of bitmapRuns(disk, 'backup')) if (run.dirty) console.log(run.offset, run.length);
 * ```
 */
export async function* bitmapRuns(dev: BlockDevice, bitmapName: string, range: ExtentRange = {}): AsyncGenerator<DirtyExtent> {
  const { offset, length } = checkedRange(dev, range);
  const bitmaps = await dev.persistentBitmaps!();
  yield* bitmaps.runs(bitmapName, offset, length);
}

/** The dirty runs of {@link bitmapRuns} only, one at a time: what an incremental backup copies. */
export async function* changedRuns(dev: BlockDevice, bitmapName: string, range: ExtentRange = {}): AsyncGenerator<Pick<DirtyExtent, 'offset' | 'length'>> {
  for await (const e of bitmapRuns(dev, bitmapName, range)) if (e.dirty) yield { offset: e.offset, length: e.length };
}

function checkedRange(dev: BlockDevice, range: ExtentRange): { offset: number; length: number } {
  if (!dev.persistentBitmaps) throw unsupported(`a ${dev.format} image holds no persistent dirty bitmaps`);
  const offset = range.offset ?? 0;
  const length = range.length ?? dev.size - offset;
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > dev.size) {
    throw new QcowError('QCOW_OUT_OF_RANGE', `range [${offset}, +${length}) is outside the disk (${dev.size} bytes)`);
  }
  return { offset, length };
}

/**
 * Every run of [offset, offset + length) of persistent bitmap `bitmapName`, dirty or clean, in
 * order and merged, as one array (see {@link bitmapRuns} for whole large disks).
 * QCOW_UNSUPPORTED for formats without persistent bitmaps.
 */
export async function bitmapExtents(dev: BlockDevice, bitmapName: string, range: ExtentRange = {}): Promise<DirtyExtent[]> {
  const { offset, length } = checkedRange(dev, range);
  const bitmaps = await dev.persistentBitmaps!();
  return bitmaps.extents(bitmapName, offset, length);
}

/**
 * The dirty runs only, as one array: what an incremental backup since bitmap `bitmapName` was
 * created (or last cleared) must copy (see {@link changedRuns} for whole large disks).
 *
 * @example
 * ```ts
 * import { openImage, changedExtents } from 'qcow/node';
 *
 * await using disk = await openImage('vm.qcow2', { readOnly: true });
 * for (const { offset, length } of await changedExtents(disk, 'backup')) console.log(offset, length);
 * ```
 */
export async function changedExtents(
  dev: BlockDevice,
  bitmapName: string,
  range: ExtentRange = {},
): Promise<
  Array<{
    /** Guest offset where the dirty run starts, in bytes. */
    offset: number;
    /** Length of the dirty run in bytes. */
    length: number;
  }>
> {
  return (await bitmapExtents(dev, bitmapName, range)).filter((e) => e.dirty).map(({ offset, length }) => ({ offset, length }));
}
