/**
 * `qcow resize [-f FMT] [--shrink] [--preallocation MODE] FILE [+|-]SIZE`: change an image's
 * virtual size, as qemu-img resize. Growing always works; shrinking needs --shrink; a
 * preallocation mode reserves what a growth adds (refused for anything but a growth, as qemu-img).
 */
import { QcowError, parseSize, type Preallocation } from '../../node.js';
import { openForCli, openPolicy, writeOut } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  shrink?: boolean;
  preallocation?: string;
  quiet?: boolean;
}

const MODES: readonly string[] = ['off', 'metadata', 'falloc', 'full'];

export async function run(file: string, sizeText: string, flags: Flags): Promise<void> {
  const m = /^([+-]?)(.*)$/.exec(sizeText)!;
  const amount = parseSize(m[2]!);
  const preallocation = (flags.preallocation ?? 'off') as Preallocation;
  if (!MODES.includes(preallocation)) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid preallocation mode '${preallocation}'`);
  // QEMU opens an encrypted image with its key to resize it; qcow needs none (nothing is encrypted).
  // With its backing chain, as qemu-img opens it: a growth's zero write over a partial cluster
  // copies the backing data before it (the cluster is allocated whole).
  const dev = await openForCli(file, flags, { inspectOnly: !openPolicy.keyToResize });
  try {
    if (!dev.resize) throw new QcowError('QCOW_UNSUPPORTED', 'Image format driver does not support resize');
    const size = m[1] === '+' ? dev.size + amount : m[1] === '-' ? dev.size - amount : amount;
    if (size <= 0) throw new QcowError('QCOW_INVALID_ARGUMENT', 'New image size must be positive');
    if (preallocation !== 'off' && size <= dev.size) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Preallocation can only be used for growing images');
    await dev.resize(size, { shrink: flags.shrink, preallocation });
  } finally {
    await dev.close();
  }
  if (!flags.quiet) writeOut('Image resized.\n');
}
