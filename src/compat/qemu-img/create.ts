/**
 * `qemu-img create [-f FMT] [-b BACKING] [-F BACKING_FMT] [-u] [-o OPTIONS] [-q] FILE [SIZE]`,
 * in QEMU's order of checks: options, size, backing file (opened to learn its size and that it
 * exists, unless -u), then the "Formatting" line, then the image.
 */
import { writeOut } from '../../cli/common.js';
import type { Parsed } from '../getopt.js';
import { qemuErrorLines, qemuMessage } from '../messages.js';
import { createOptionNames, formattingLine, optionKind } from './formatting.js';
import { qemuSizeExact, secretsOf, SizeError, splitOptions } from './options.js';

const PROGRAM = 'qemu-img';

/** A failure reported as `qemu-img: FILE: message` (plus hint lines), exit 1. */
class CreateError extends Error {}

export async function create(parsed: Parsed): Promise<number> {
  let fmt = 'raw';
  let backing: string | undefined;
  let backingFmt: string | undefined;
  let quiet = false;
  let unsafe = false;
  const optionTexts: string[] = [];
  for (const o of parsed.options) {
    if (o.key === 'f') fmt = o.value!;
    else if (o.key === 'b') backing = o.value;
    else if (o.key === 'F') backingFmt = o.value;
    else if (o.key === 'o') optionTexts.push(o.value!);
    else if (o.key === 'q') quiet = true;
    else if (o.key === 'u') unsafe = true;
  }
  const secrets = secretsOf(parsed);
  const [file, sizeText, extra] = parsed.operands;
  const given = splitOptions(optionTexts.join(','));
  if (given.has('help') || given.has('?')) {
    const names = createOptionNames(fmt) ?? [];
    writeOut(`Supported ${fmt} options:\n${names.map((n) => `  ${n}\n`).join('')}\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n`);
    return 0;
  }
  if (file === undefined) {
    process.stderr.write(`${PROGRAM}: Expecting image file name\nTry '${PROGRAM} --help' for more information\n`);
    return 1;
  }
  let size: bigint | undefined;
  try {
    if (sizeText !== undefined) size = qemuSizeExact(sizeText);
  } catch (e) {
    if (!(e instanceof SizeError)) throw e;
    process.stderr.write(e.lines('image size').map((l) => `${PROGRAM}: ${l}\n`).join(''));
    return 1;
  }
  if (extra !== undefined) {
    process.stderr.write(`${PROGRAM}: Unexpected argument: ${extra}\nTry '${PROGRAM} --help' for more information\n`);
    return 1;
  }
  try {
    await make(file, fmt, { size, backing, backingFmt, unsafe, quiet, given, password: secrets.get(given.get(secretOption(fmt)) ?? '') });
    return 0;
  } catch (e) {
    if (e instanceof Handled) return 1;
    // A hint QEMU appends ends without a newline, as QEMU prints it.
    if (e instanceof CreateError) process.stderr.write(`${PROGRAM}: ${file}: ${e.message}${e.message.includes('\n') ? '' : '\n'}`);
    else process.stderr.write(qemuErrorLines(PROGRAM, e, { op: 'run', file }).replace(`${PROGRAM}: `, `${PROGRAM}: ${file}: `).replace(`${file}: ${file}: `, `${file}: `));
    return 1;
  }
}

interface Settings {
  size: bigint | undefined;
  backing: string | undefined;
  backingFmt: string | undefined;
  unsafe: boolean;
  quiet: boolean;
  given: Map<string, string>;
  password: string | undefined;
}

async function make(file: string, asked: string, s: Settings): Promise<void> {
  // `-f file`: QEMU's file protocol driver as the format, a plain file of the size given: what raw
  // creates, with raw's options. The Formatting line names the driver asked for.
  const fmt = asked === 'file' ? 'raw' : asked;
  const { builtinFormats, createImage, openImage, defaultOpener } = await import('../../cli/open-images.js');
  if (!builtinFormats().names().includes(fmt)) throw new CreateError(`Unknown file format '${fmt}'`);
  const names = createOptionNames(fmt) ?? [];
  const values = new Map<string, string>();
  for (const [k, v] of s.given) {
    if (!names.includes(k)) throw new CreateError(`Invalid parameter '${k}'`);
    const kind = optionKind(fmt, k);
    if (kind === 'size' || kind === 'number') {
      try {
        values.set(k, String(kind === 'size' ? qemuSizeExact(v) : BigInt(v)));
      } catch (e) {
        throw new CreateError(optionValueComplaint(k, v, kind, e));
      }
    } else values.set(k, v);
  }
  let size = s.size;
  if (values.has('size')) {
    if (size !== undefined) throw new CreateError('The image size must be specified only once');
    size = BigInt(values.get('size')!);
  }
  if (s.backing !== undefined) {
    if (!names.includes('backing_file')) throw new CreateError(`Backing file not supported for file format '${fmt}'`);
    values.set('backing_file', s.backing);
  }
  if (s.backingFmt !== undefined) {
    if (!names.includes('backing_fmt')) throw new CreateError(`Backing file format not supported for file format '${fmt}'`);
    values.set('backing_fmt', s.backingFmt);
  }
  const backing = values.get('backing_file');
  const backingFmt = values.get('backing_fmt');
  if (backing !== undefined) {
    if (backing === file) throw new CreateError('Error: Trying to create an image with the same filename as the backing file');
    if (backing === '') throw new CreateError('Expected backing file name, got empty string');
  }
  // A backing name in QEMU's own kinds (json:{...}, blkdebug:...) is no path: it opens as it says.
  const { jsonOpenerFor } = await import('../json-open.js');
  const special = backing === undefined ? undefined : jsonOpenerFor(backing);
  if (backing !== undefined && !s.unsafe) {
    const full = special ? backing : defaultOpener.resolve(backing, file);
    let dev;
    try {
      // As QEMU's create: shared with every user (a VM running on the backing file does not stop
      // an overlay being made over it; the overlay's size is all that is read).
      const options = { format: backingFmt, readOnly: true, inspectOnly: true, noBacking: true, forceShare: true };
      dev = await (special ? special(options) : openImage(full, options));
    } catch (e) {
      process.stderr.write(qemuErrorLines(PROGRAM, e, { op: 'create-backing', file, backing: full }));
      throw new Handled();
    }
    try {
      if (backingFmt === undefined) throw new CreateError(`Backing file specified without backing format\nDetected format of ${dev.format ?? 'raw'}.`);
      size ??= BigInt(dev.size);
    } finally {
      await dev.close();
    }
  } else if (backing !== undefined && backingFmt === undefined) throw new CreateError('Backing file specified without backing format');
  if (size === undefined) throw new CreateError('Image creation needs a size parameter');
  values.set('size', String(size));
  if (!s.quiet) writeOut(formattingLine(file, asked, values) + '\n');
  // QEMU's drivers create images a whole number of 512-byte sectors long (1234 bytes -> 1536); the
  // Formatting line above still shows the size as given (iotest 104).
  size = (size + 511n) & ~511n;
  // Whole sectors are exact as numbers below 2^62 (core/bytes.ts), past every format's limit.
  if (size >= 2n ** 62n) {
    throw new CreateError(`The image size is too large for file format '${fmt}'${optionKind(fmt, 'cluster_size') ? ' (try using a larger cluster size)' : ''}`);
  }
  // What our formats take: everything but what create settles itself and the file protocol's tuning.
  const options: Record<string, string> = {};
  for (const [k, v] of s.given) {
    if (['size', 'backing_file', 'backing_fmt', 'nocow', 'extent_size_hint', secretOption(fmt)].includes(k)) continue;
    options[k] = v;
  }
  if (values.has(secretOption(fmt)) && s.password === undefined) throw new CreateError(`No secret with id '${values.get(secretOption(fmt))}'`);
  // QEMU's file protocol prefix names a plain file.
  const path = file.startsWith('file:') ? file.slice(5) : file;
  try {
    // Such a backing file was checked above; the chain's create would take its name for a path.
    await createImage(path, { format: fmt, size: Number(size), backingFile: backing, backingFormat: backingFmt, options, unsafe: s.unsafe || !!special, password: s.password });
  } catch (e) {
    // The file protocol's own complaint ("Could not create 'X': ...") when the file cannot be made.
    const text = qemuMessage(e, { op: 'create-file', file: path });
    throw text === (e as Error)?.message ? e : new CreateError(text);
  }
}

/**
 * QEMU's complaint about an -o value of a size or number option it cannot parse. A size that does
 * not parse also gets QEMU's hint about the suffixes (two lines of their own, ending the message).
 */
function optionValueComplaint(name: string, value: string, kind: 'size' | 'number', e: unknown): string {
  if (kind === 'number') return `Parameter '${name}' expects a number`;
  if (e instanceof SizeError && e.range) return `Value '${value}' is out of range for parameter '${name}'`;
  return `Parameter '${name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n`;
}

/** The option naming the secret that holds the password: the luks format's own, or qcow2's and qcow's `encrypt.` one. */
const secretOption = (fmt: string): string => (fmt === 'luks' ? 'key-secret' : 'encrypt.key-secret');

/** The message is already out. */
class Handled extends CreateError {}
