/**
 * `qemu-img dd [--image-opts] [-U] [-f FMT] [-O OUTPUT_FMT] [bs=N] [count=N] [skip=N] if=IN of=OUT`:
 * the operands read with QEMU's size rules and complaints, then qcow's dd (cli/commands/dd.ts),
 * its failures in QEMU's words.
 */
import type { Parsed } from '../getopt.js';
import { contextOf, qemuErrorLines, qemuMessage } from '../messages.js';
import { qemuSizeExact, SizeError } from './options.js';
import { QcowError } from '../../node.js';

const PROGRAM = 'qemu-img';

/** A complaint already in QEMU's lines (each gets the program prefix). */
class Lines extends Error {
  constructor(readonly lines: string[]) {
    super(lines.join(' '));
  }
}

/** qemu-img's cvtnum_full: a size within [min, max], else its two kinds of complaint. */
function qemuNumber(name: string, text: string, min: bigint, max: bigint): bigint {
  let v: bigint | undefined;
  try {
    v = qemuSizeExact(text);
  } catch (e) {
    if (!(e instanceof SizeError)) throw e;
    if (!e.range) throw new Lines(e.lines(name));
  }
  if (v === undefined || v < min || v > max) throw new Lines([`Invalid ${name} specified. Must be between ${min} and ${max}.`]);
  return v;
}

export async function dd(parsed: Parsed): Promise<number> {
  let format: string | undefined;
  let outputFormat = 'raw';
  let forceShare = false;
  let imageOpts = false;
  for (const o of parsed.options) {
    if (o.key === 'f') format = o.value;
    else if (o.key === 'O') outputFormat = o.value!;
    else if (o.key === 'U') forceShare = true;
    else if (o.key === 'image-opts') imageOpts = true;
  }
  const cmd = await import('../../cli/commands/dd.js');
  let input: string | undefined;
  try {
    const req = cmd.parseDdOperands(parsed.operands, qemuNumber);
    // --image-opts names the input by options (the output never: qemu-img creates it by name).
    if (imageOpts) {
      const kv = new Map(req.input.split(',').map((p) => [p.slice(0, p.indexOf('=')), p.slice(p.indexOf('=') + 1)] as const));
      const driver = kv.get('driver');
      if (driver && driver !== 'file') format = driver;
      req.input = kv.get('file.filename') ?? kv.get('filename') ?? req.input;
    }
    input = req.input;
    await cmd.dd(req, { format, outputFormat, forceShare }, (line) => process.stderr.write(`${PROGRAM}: ${line}\n`));
    return 0;
  } catch (e) {
    if (e instanceof cmd.DdCreateError) {
      process.stderr.write(`${PROGRAM}: ${e.output}: error while creating output image: ${qemuMessage(e.cause, { op: 'create-file', file: e.output })}\n`);
    } else if (e instanceof Lines) process.stderr.write(e.lines.map((l) => `${PROGRAM}: ${l}\n`).join(''));
    else if (e instanceof QcowError && e.code === 'QCOW_INVALID_ARGUMENT') process.stderr.write(`${PROGRAM}: ${e.message}\n`);
    else process.stderr.write(qemuErrorLines(PROGRAM, e, { op: contextOf(e), file: (e as QcowError)?.file ?? input }));
    return 1;
  }
}
