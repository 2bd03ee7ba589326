/**
 * `qcow amend [-f FMT] -o OPTIONS FILE`: change options of an existing image in place, as
 * qemu-img amend does, through the format's own amend (ops/amend.ts; qcow2 has one: compat,
 * lazy_refcounts, refcount_bits, size; raw and qcow v1 do not, as in QEMU). `-o help` lists the
 * options of the format named by -f, or else of the image's.
 */
import { QcowError, amendImage, amendOptions, builtinFormats } from '../../node.js';
import { openForCli, parseOptionList, secretNamed, withProgress, writeOut } from '../common.js';

interface Flags {
  format?: string;
  options?: string[];
  passwordFile?: string;
  quiet?: boolean;
  force?: boolean;
  progress?: boolean;
}

export async function run(file: string, flags: Flags): Promise<void> {
  const options = parseOptionList(flags.options);
  if (options.help !== undefined) {
    await printHelp(file, flags);
    return;
  }
  if (flags.options === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Must specify options (-o)');
  const dev = await openForCli(file, flags, { noBacking: true });
  try {
    // -p draws the format's own measure of the work (qcow2: qemu-img's passes over the refcounts).
    const context = { force: flags.force, secret: secretNamed };
    await withProgress(flags, (_signal, bar) => amendImage(dev, options, bar.active ? bar : undefined, context));
  } finally {
    await dev.close();
  }
}

/** The format's amend options; as qemu-img, the image is only opened when -f does not name the format. */
async function printHelp(file: string, flags: Flags): Promise<void> {
  let name = flags.format;
  if (name === undefined) {
    // Only the format is wanted: no backing chain, no password, a damaged image still answers.
    const dev = await openForCli(file, flags, { readOnly: true, noBacking: true, inspectOnly: true });
    name = dev.format;
    await dev.close();
  }
  const list = amendOptions(builtinFormats().get(name));
  writeOut(`Amend options for '${name}':\n`);
  for (const [k, v] of Object.entries(list)) writeOut(`  ${k.padEnd(22)} - ${v}\n`);
}
