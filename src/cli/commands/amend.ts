/**
 * `qcow amend [-f qcow2] -o OPTIONS FILE`: change options of an existing qcow2 image in place, as
 * qemu-img amend does (compat, lazy_refcounts, refcount_bits, size; see formats/qcow2/amend.ts).
 * `-o help` lists the options.
 */
import { QcowError } from '../../core/errors.js';
import { AMEND_OPTIONS, amendQcow2 } from '../../formats/qcow2/amend.js';
import type { Qcow2Device } from '../../formats/qcow2/qcow2.js';
import { openForCli, parseOptionList, writeOut } from '../common.js';

interface Flags {
  format?: string;
  options?: string[];
  passwordFile?: string;
  quiet?: boolean;
}

export async function run(file: string, flags: Flags): Promise<void> {
  const options = parseOptionList(flags.options);
  if (options.help !== undefined) {
    writeOut("Amend options for 'qcow2':\n");
    for (const [k, v] of Object.entries(AMEND_OPTIONS)) writeOut(`  ${k.padEnd(22)} - ${v}\n`);
    return;
  }
  if (flags.options === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Must specify options (-o)');
  const dev = await openForCli(file, flags, { noBacking: true });
  try {
    if (dev.format !== 'qcow2') throw new QcowError('QCOW_UNSUPPORTED', `Format driver '${dev.format}' does not support option amendment`);
    await amendQcow2(dev as Qcow2Device, options);
  } finally {
    await dev.close();
  }
}
