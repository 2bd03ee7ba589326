/**
 * `qcow resize [-f FMT] [--shrink] FILE [+|-]SIZE`: change an image's virtual size, as qemu-img
 * resize. Growing always works; shrinking needs --shrink (raw images only, for now).
 */
import { QcowError, parseSize } from '../../node.js';
import { openForCli, writeOut } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  shrink?: boolean;
  quiet?: boolean;
}

export async function run(file: string, sizeText: string, flags: Flags): Promise<void> {
  const m = /^([+-]?)(.*)$/.exec(sizeText)!;
  const amount = parseSize(m[2]!);
  const dev = await openForCli(file, flags, { noBacking: true, inspectOnly: true });
  try {
    if (!dev.resize) throw new QcowError('QCOW_UNSUPPORTED', 'Image format driver does not support resize');
    const size = m[1] === '+' ? dev.size + amount : m[1] === '-' ? dev.size - amount : amount;
    if (size < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', 'New image size must be positive');
    await dev.resize(size, { shrink: flags.shrink });
  } finally {
    await dev.close();
  }
  if (!flags.quiet) writeOut('Image resized.\n');
}
