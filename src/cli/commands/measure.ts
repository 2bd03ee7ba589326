import { QcowError, byteCountText, parseSize, builtinFormats, measure, type BlockDevice, type MeasureResult } from '../../node.js';
import { checkOutputFormat, openForCli, parseOptionList, printJson, writeOut } from '../common.js';

interface Flags {
  format?: string;
  outputFormat?: string;
  options?: string[];
  size?: string;
  snapshot?: string;
  output?: string;
  passwordFile?: string;
}

/** `qcow measure [-O FMT] [-o ...] (--size SIZE | [-f FMT] [-l SNAPSHOT] SRC)`, qemu-img's output. */
export async function run(file: string | undefined, flags: Flags): Promise<void> {
  const output = checkOutputFormat(flags.output);
  if (flags.size !== undefined && file !== undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', '--size N cannot be used together with a filename.');
  if (flags.size === undefined && file === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Either --size N or one filename must be specified.');
  const size = flags.size === undefined ? undefined : parseSize(flags.size, 'image size');
  const formats = builtinFormats();
  const target = formats.get(flags.outputFormat ?? 'raw');
  const options = parseOptionList(flags.options);
  // --size wins over -o size, as in qemu-img.
  if (size !== undefined) delete options.size;
  let src: BlockDevice | undefined;
  let r: MeasureResult;
  try {
    if (file !== undefined) src = await openForCli(file, flags, { readOnly: true, snapshot: flags.snapshot });
    r = await measure({ format: target, options, knownOptions: target.createOptions, size, source: src });
  } finally {
    await src?.close();
  }
  if (output === 'json') printJson(r);
  else {
    writeOut(`required size: ${byteCountText(r.required)}\nfully allocated size: ${byteCountText(r['fully-allocated'])}\n`);
    if (r.bitmaps !== undefined) writeOut(`bitmaps size: ${r.bitmaps}\n`);
  }
}
