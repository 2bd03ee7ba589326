/**
 * `qcow dd [-f FMT] [-O FMT] [-U] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT`, as qemu-img dd:
 * creates OUTPUT (format -O, raw by default) as large as what is copied, then copies INPUT's guest
 * bytes into it. The operands are dd(1)'s `key=value` words; compat/qemu-img parses them with
 * QEMU's size rules and words, and runs `dd` below.
 */
import { QcowError, parseSize, ddPlan, ddCopy } from '../../node.js';
import { failureStyle, openForCli } from '../common.js';

export interface DdRequest {
  input: string;
  output: string;
  blockSize: number;
  count?: bigint;
  skip?: bigint;
}

/** The output image could not be created (`cause` says why). */
export class DdCreateError extends QcowError {
  constructor(
    readonly output: string,
    cause: unknown,
  ) {
    super(cause instanceof QcowError ? cause.code : 'QCOW_IO', `${output}: error while creating output image: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
  }
}

/** Reads operand `name`'s number (a size, suffixes allowed) within [min, max]; throws when it cannot. */
export type DdNumber = (name: string, text: string, min: bigint, max: bigint) => bigint;

const INT64_MAX = (1n << 63n) - 1n;
const INT_MAX = (1n << 31n) - 1n;

/** The operands in order, as qemu-img reads them: the first bad one is the error; a later one of a kind wins. */
export function parseDdOperands(operands: string[], number: DdNumber): DdRequest {
  const r: Partial<DdRequest> = { blockSize: 512 };
  for (const word of operands) {
    const eq = word.indexOf('=');
    const key = eq < 0 ? word : word.slice(0, eq);
    const value = word.slice(eq + 1);
    if (eq < 0 || !['bs', 'count', 'if', 'of', 'skip'].includes(key)) throw new QcowError('QCOW_INVALID_ARGUMENT', `unrecognized operand ${key}`);
    if (key === 'bs') r.blockSize = Number(number('bs', value, 1n, INT_MAX));
    else if (key === 'count') r.count = number('count', value, 0n, INT64_MAX);
    else if (key === 'skip') r.skip = number('skip', value, 0n, INT64_MAX);
    else if (key === 'if') r.input = value;
    else r.output = value;
  }
  if (r.input === undefined || r.output === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Must specify both input and output files');
  return r as DdRequest;
}

export interface DdFlags {
  format?: string;
  outputFormat?: string;
  forceShare?: boolean;
  passwordFile?: string;
}

/** The copy, in qemu-img's order: open the input, check the output format, create, open, copy. */
export async function dd(req: DdRequest, flags: DdFlags, warn: (line: string) => void): Promise<void> {
  const { builtinFormats, createImage } = await import('../open-images.js');
  const src = await openForCli(req.input, { format: flags.format, passwordFile: flags.passwordFile, forceShare: flags.forceShare }, { readOnly: true });
  try {
    const outFormat = flags.outputFormat ?? 'raw';
    if (!builtinFormats().names().includes(outFormat)) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Unknown file format');
    const plan = ddPlan(src.size, { blockSize: req.blockSize, count: req.count, skip: req.skip });
    try {
      await createImage(req.output, { format: outFormat, size: plan.outputSize });
    } catch (e) {
      throw new DdCreateError(req.output, e);
    }
    const dst = await openForCli(req.output, { format: outFormat }, { noBacking: true });
    try {
      // Like dd(1), a skip past the end is only a warning: the output is left empty.
      if (plan.skipPastEnd) warn(`${req.input}: cannot skip to specified offset`);
      await ddCopy(src, dst, plan);
    } finally {
      await dst.close();
    }
  } finally {
    await src.close();
  }
}

/** qcow's own numbers: qcow's size syntax, one-line errors. */
const qcowNumber: DdNumber = (name, text, min, max) => {
  const v = BigInt(parseSize(text, name));
  if (v < min || v > max) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid ${name} specified. Must be between ${min} and ${max}.`);
  return v;
};

export async function run(operands: string[], flags: DdFlags): Promise<void> {
  const req = parseDdOperands(operands, qcowNumber);
  await dd(req, flags, (line) => process.stderr.write(`${failureStyle.program}: ${line}\n`));
}
