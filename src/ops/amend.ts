/**
 * `qemu-img amend`: change options of an image in place, through the format's own amend
 * (`BlockDevice.amend`, which QEMU's drivers have as `bdrv_amend_options`). Formats without one
 * (raw, qcow v1) refuse in qemu-img's words, for the option list (`-o help`) as for a change.
 */
import type { AmendContext, AmendProgressCallback, BlockDevice, ImageFormat } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';

// Without the file name, as qemu-img words it: the refusal is the format's, whatever the image.
function notAmendable(format: string): QcowError {
  return new QcowError('QCOW_UNSUPPORTED', `Format driver '${format}' does not support option amendment`);
}

/**
 * Apply the -o `options` (key=value pairs as given, e.g. `{ compat: '0.10' }`) to `dev`, opened
 * read-write without its backing chain as qemu-img opens it. QCOW_UNSUPPORTED where the format
 * has no amend; QCOW_INVALID_ARGUMENT or QCOW_UNSUPPORTED for options the format refuses, before
 * anything is written.
 *
 * @example
 * ```ts
 * import { amendImage } from 'qcow';
 * import { openImage } from 'qcow/node';
 *
 * const dev = await openImage('disk.qcow2', { noBacking: true });
 * try {
 *   await amendImage(dev, { compat: '0.10' }); // a v3 image becomes v2, as qemu-img amend makes it
 * } finally {
 *   await dev.close();
 * }
 * ```
 */
export async function amendImage(dev: BlockDevice, options: Record<string, string>, progress?: AmendProgressCallback, context?: AmendContext): Promise<void> {
  if (!dev.amend) throw notAmendable(dev.format);
  await dev.amend(options, progress, context);
}

/**
 * The options `format`'s amend accepts, with help text (what `qemu-img amend -o help` lists);
 * QCOW_UNSUPPORTED where the format has no amend.
 */
export function amendOptions(format: ImageFormat): Record<string, string> {
  if (!format.amendOptions) throw notAmendable(format.name);
  return format.amendOptions;
}
