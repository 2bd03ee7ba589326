import { QcowError, parseSize, builtinFormats, createImage } from '../../node.js';
import { parseOptionList, readPasswordFile, writeOut } from '../common.js';

interface Flags {
  format: string;
  options?: string[];
  backing?: string;
  backingFormat?: string;
  unsafe?: boolean;
  quiet?: boolean;
  passwordFile?: string;
}

export async function run(file: string, sizeText: string | undefined, flags: Flags): Promise<void> {
  const options = parseOptionList(flags.options);
  if (options.help !== undefined) {
    // qemu-img's `-o help`: the options this format takes at create.
    const fmt = builtinFormats().get(flags.format);
    writeOut(`Supported options:\n`);
    for (const [k, v] of Object.entries(fmt.createOptions ?? { size: 'Virtual disk size' })) writeOut(`  ${k.padEnd(24)}- ${v}\n`);
    return;
  }
  // qemu-img also takes these as -o options.
  const backingFile = flags.backing ?? options.backing_file;
  const backingFormat = flags.backingFormat ?? options.backing_fmt;
  delete options.backing_file;
  delete options.backing_fmt;
  if (options.size !== undefined) {
    sizeText ??= options.size;
    delete options.size;
  }
  if (sizeText === undefined && !backingFile) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Image creation needs a size parameter');
  const size = sizeText === undefined ? 0 : parseSize(sizeText);
  if (backingFile && !backingFormat) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Backing file specified without backing format (use -F FMT)');
  if (!flags.quiet) {
    const extra = Object.entries(options)
      .map(([k, v]) => ` ${k}=${v}`)
      .join('');
    writeOut(`Formatting '${file}', fmt=${flags.format}${size ? ` size=${size}` : ''}${backingFile ? ` backing_file=${backingFile}` : ''}${extra}\n`);
  }
  await createImage(file, {
    format: flags.format,
    size,
    backingFile,
    backingFormat,
    options,
    unsafe: flags.unsafe,
    password: await readPasswordFile(flags.passwordFile),
  });
}
