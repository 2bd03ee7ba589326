/**
 * `convert --bitmaps`: carry every persistent dirty bitmap of the source image to the target,
 * with its name, granularity, enabled state and contents, as qemu-img convert --bitmaps does.
 * Checked before the conversion starts (checkBitmapCopy) so that a refusal costs no copy;
 * copied after it (copyBitmaps), one bitmap at a time, each read a data cluster at a time.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, unsupported, withFile } from '../core/errors.js';

/** Options of {@link checkBitmapCopy} and {@link copyBitmaps}. */
export interface BitmapCopyOptions {
  /** Leave inconsistent bitmaps behind (reported through onSkip) instead of refusing. */
  skipBroken?: boolean;
  /** Told the name of each bitmap left behind. */
  onSkip?: (name: string) => void;
}

/**
 * The bitmaps in the order QEMU walks a node's bitmaps: its in-memory list gets each bitmap at
 * the head as the directory is read, so the last entry comes first. Which broken bitmap a
 * refusal names, and the order of the skip warnings, follow it.
 */
function newestFirst<T>(list: readonly T[]): T[] {
  return [...list].reverse();
}

/** Refuse what qemu-img refuses before converting: a source without bitmaps, broken ones. */
export async function checkBitmapCopy(sources: BlockDevice[], options: BitmapCopyOptions = {}): Promise<void> {
  if (sources.length !== 1) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Copying bitmaps only possible with single source');
  const src = sources[0]!;
  if (!src.persistentBitmaps) throw unsupported('Source lacks bitmap support');
  if (options.skipBroken) return;
  const broken = newestFirst((await src.persistentBitmaps()).list()).find((b) => b.unusable);
  if (broken) throw new QcowError('QCOW_UNSUPPORTED', `Cannot copy inconsistent bitmap '${broken.name}'. Try --skip-broken-bitmaps, or use 'qcow bitmap --remove' to delete it`, { file: src.filename });
}

/** Copy every persistent bitmap of `src` into `dst` (after the guest data is converted). */
export async function copyBitmaps(src: BlockDevice, dst: BlockDevice, options: BitmapCopyOptions = {}): Promise<void> {
  // qcow2 v2 (compat=0.10) has no bitmaps extension: qemu-img names the driver for it as well.
  const compat = dst.editBitmaps ? (await dst.describe()).formatSpecific?.data['compat'] : undefined;
  if (!dst.editBitmaps || compat === '0.10') throw unsupported(`Format driver '${dst.format}' does not support bitmaps`);
  if (!src.persistentBitmaps) throw unsupported('Source lacks bitmap support');
  const from = await src.persistentBitmaps();
  const list = from.list();
  for (const b of newestFirst(list)) {
    if (!b.unusable) continue;
    if (!options.skipBroken) throw new QcowError('QCOW_UNSUPPORTED', `Cannot copy inconsistent bitmap '${b.name}'`, { file: src.filename });
    options.onSkip?.(b.name);
  }
  // Added in the source's directory order, which is where QEMU's copies land too (its walk of
  // the target's bitmaps at close reverses its walk of the source's).
  for (const b of list) {
    if (b.unusable) continue;
    await dst.editBitmaps(async (to) => {
      try {
        await to.add(b.name, { granularity: b.granularity, disabled: !b.auto });
      } catch (e) {
        if (e instanceof QcowError) e.message = `Failed to create bitmap ${b.name}: ${e.message}`;
        throw e;
      }
      // What goes wrong reading the source's table or data is about the source image.
      await to.merge(b.name, b.name, from).catch((e: unknown) => {
        throw withFile(e, src.filename);
      });
    });
  }
}
