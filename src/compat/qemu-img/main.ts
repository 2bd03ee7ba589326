/**
 * `qemu-img` as qcow (compat/qemu-img): QEMU 7.2's command line, output, messages and exit codes
 * over qcow's own commands. Arguments are scanned as QEMU scans them (its option letters per
 * command, mixed options and operands, `--object`, `--image-opts`, `-T`, cache modes accepted),
 * then each command either runs here (create: QEMU's "Formatting" line) or is handed to the qcow
 * command of the same name with the options that mean the same thing. Every failure is worded by
 * ../messages.ts.
 */
import { QcowError } from '../../node.js';
import { runQcow, type FailureStyle } from '../../cli/program.js';
import { openPolicy, progressStyle, writeOut } from '../../cli/common.js';
import { getopt, GetoptError, type LongOption, type Parsed } from '../getopt.js';
import { qemuJson } from '../qemu-json.js';
import { jsonOpenerFor } from '../json-open.js';
import { isJsonFilename, jsonFilenameOptions } from '../json-filename.js';
import { nbdTargetOf, nbdTargetOfOptions } from '../nbd-store.js';
import { fromImageOpts, parseImageOpts, type SpecialOpen } from './image-opts.js';
import { secretsOf } from './options.js';
import { backingOptionsRefused } from '../backing-options.js';
import { contextOf, qemuErrorLines } from '../messages.js';
import { probedRawWarning } from '../probed-raw.js';
import { corruptionLine } from '../corruption-line.js';

const PROGRAM = 'qemu-img';
const VERSION = 'qemu-img version 7.2.0 (qcow compat)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n';

const long = (name: string, arg: boolean, key = name): LongOption => ({ name, arg, key });
const COMMON: LongOption[] = [long('help', false, 'h'), long('object', true), long('image-opts', false), long('force-share', false, 'U')];

/** Each command: QEMU's option letters and long options. */
const SPECS: Record<string, { short: string; longs: LongOption[] }> = {
  create: { short: ':F:b:f:ho:qu', longs: [long('help', false, 'h'), long('object', true)] },
  check: { short: ':hf:r:T:qU', longs: [...COMMON, long('format', true, 'f'), long('repair', true, 'r'), long('output', true)] },
  commit: { short: ':f:ht:b:dpqr:', longs: COMMON },
  compare: { short: ':hf:F:T:pqsU', longs: COMMON },
  dd: { short: ':hf:O:U', longs: COMMON },
  convert: {
    short: ':hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:',
    longs: [...COMMON, long('target-image-opts', false), long('salvage', false), long('target-is-zero', false), long('bitmaps', false), long('skip-broken-bitmaps', false)],
  },
  info: { short: ':f:hU', longs: [...COMMON, long('format', true, 'f'), long('output', true), long('backing-chain', false)] },
  map: { short: ':f:s:l:hU', longs: [...COMMON, long('format', true, 'f'), long('output', true), long('start-offset', true, 's'), long('max-length', true, 'l')] },
  snapshot: { short: ':la:c:d:hqU', longs: COMMON },
  rebase: { short: ':hf:F:b:upt:T:qU', longs: COMMON },
  resize: { short: ':f:hq', longs: [...COMMON, long('preallocation', true), long('shrink', false)] },
  amend: { short: ':ho:f:t:pq', longs: [...COMMON, long('force', false)] },
  bitmap: {
    short: ':b:f:F:g:h',
    longs: [
      long('help', false, 'h'),
      long('object', true),
      long('image-opts', false),
      long('add', false),
      long('remove', false),
      long('clear', false),
      long('enable', false),
      long('disable', false),
      long('merge', true),
      long('granularity', true, 'g'),
      long('source-file', true, 'b'),
      long('source-format', true, 'F'),
    ],
  },
  measure: { short: 'hf:O:o:l:U', longs: [...COMMON, long('output', true), long('size', true)] },
  bench: {
    short: ':hc:d:f:ni:o:qs:S:t:wU',
    longs: [long('help', false, 'h'), long('flush-interval', true), long('image-opts', false), long('pattern', true), long('no-drain', false), long('force-share', false, 'U')],
  },
};

/** qemu-img's error_exit: the message, then where to look for help; exit 1. */
class UsageError extends Error {}

export async function main(argv: string[]): Promise<void> {
  const args = argv.slice(2);
  try {
    process.exitCode = await dispatch(args);
  } catch (e) {
    if (e instanceof UsageError || e instanceof GetoptError) {
      process.stderr.write(`${PROGRAM}: ${e.message}\nTry '${PROGRAM} --help' for more information\n`);
    } else {
      process.stderr.write(qemuErrorLines(PROGRAM, e, { op: contextOf(e), file: (e as QcowError).file }));
    }
    process.exitCode = 1;
  }
}

async function dispatch(args: string[]): Promise<number> {
  // Global options before the command: -V/--version, -h/--help, -T/--trace.
  while (args.length > 0 && args[0]!.startsWith('-')) {
    const a = args.shift()!;
    if (a === '-V' || a === '--version') {
      writeOut(VERSION);
      return 0;
    }
    if (a === '-h' || a === '--help') {
      writeOut(`usage: ${PROGRAM} [standard options] command [command options]\nQEMU disk image utility (qcow compat)\n`);
      return 0;
    }
    if (a === '-T' || a === '--trace') args.shift();
    else if (!a.startsWith('-T') && !a.startsWith('--trace=')) throw new UsageError(`unrecognized option '${a}'`);
  }
  const cmd = args.shift();
  if (cmd === undefined) throw new UsageError('Not enough arguments');
  const spec = Object.hasOwn(SPECS, cmd) ? SPECS[cmd] : undefined;
  if (!spec) throw new UsageError(`Command not found: ${cmd}`);
  // resize: the size is the last word, taken before scanning so "-1G" is not an option.
  let resizeSize: string | undefined;
  if (cmd === 'resize') {
    if (args.length < 1) throw new UsageError('Not enough arguments');
    resizeSize = args.pop();
  }
  const parsed = getopt(args, spec.short, spec.longs);
  if (parsed.options.some((o) => o.key === 'h')) {
    writeOut(`usage: ${PROGRAM} ${cmd} ...\n`);
    return 0;
  }
  if (cmd === 'create') {
    const { create } = await import('./create.js');
    return create(parsed);
  }
  if (cmd === 'measure') {
    const { measureArgsComplaint } = await import('./measure-args.js');
    const complaint = measureArgsComplaint(parsed);
    if (complaint) {
      process.stderr.write(complaint.map((l) => `${PROGRAM}: ${l}\n`).join(''));
      return 1;
    }
  }
  if (cmd === 'dd') {
    const { dd } = await import('./dd.js');
    return dd(parsed);
  }
  return delegate(cmd, parsed, resizeSize);
}

/** The qcow options each QEMU option becomes (undefined: accepted and ignored). */
function translate(cmd: string, key: string, value: string | undefined): string[] | undefined {
  const v = value ?? '';
  switch (key) {
    case 'object':
    case 'T':
    case 'image-opts':
    case 'target-image-opts':
    case 'r' as string:
      if (key === 'r' && cmd === 'check') return ['-r', v];
      return undefined;
    case 'C':
      return cmd === 'convert' ? ['-C'] : undefined;
    case 'U':
      return cmd === 'commit' || cmd === 'resize' || cmd === 'amend' ? undefined : ['-U'];
    case 't':
      return cmd === 'commit' || cmd === 'rebase' || cmd === 'convert' ? ['-t', v] : undefined;
    case 'output':
      // qcow's own outputs (map's svg and html) are not qemu-img's.
      if (v !== 'human' && v !== 'json') throw new QcowError('QCOW_INVALID_ARGUMENT', '--output must be used with human or json as argument.');
      return [`--output=${v}`];
    case 'backing-chain':
    case 'shrink':
      return [`--${key}`];
    case 'size':
      return ['--size', v];
    case 'force':
      return cmd === 'amend' ? ['--force'] : undefined;
    case 'salvage':
      return ['--salvage'];
    case 'target-is-zero':
      return undefined;
    case 'preallocation':
      return cmd === 'resize' ? ['--preallocation', v!] : undefined;
    case 'bitmaps':
    case 'skip-broken-bitmaps':
      return [`--${key}`];
    case 's':
      if (cmd === 'map') return ['--start-offset', v];
      return ['-s'];
    case 'l':
      if (cmd === 'map') return ['--max-length', v];
      if (cmd === 'snapshot') return ['-l'];
      return ['-l', v];
    case 'flush-interval':
    case 'pattern':
    case 'merge':
      return [`--${key}`, v];
    case 'add':
    case 'remove':
    case 'clear':
    case 'enable':
    case 'disable':
      return [`--${key}`];
    case 'no-drain':
      return ['--no-drain'];
    default:
      return value === undefined ? [`-${key}`] : [`-${key}`, value];
  }
}

async function delegate(cmd: string, parsed: Parsed, resizeSize: string | undefined): Promise<number> {
  const out: string[] = [];
  for (const o of parsed.options) out.push(...(translate(cmd, o.key, o.value) ?? []));
  const imageOpts = parsed.options.some((o) => o.key === 'image-opts');
  const refusal = forceShareRefusal(cmd, parsed, imageOpts);
  if (refusal) {
    process.stderr.write(`${PROGRAM}: ${refusal}\n`);
    return 1;
  }
  let operands = parsed.operands;
  // --object secret: the passwords key-secret options name. Operands that a plain open would not
  // do justice to (key secrets, NBD exports) open through their own opener, by name.
  const secrets = secretsOf(parsed);
  const special = new Map<string, SpecialOpen>();
  if (imageOpts) {
    operands = operands.map((x, i) => {
      // compare's second image has its own format option.
      const name = fromImageOpts(x, out, secrets, cmd === 'check' ? undefined : special, cmd === 'compare' && i === 1 ? '-F' : '-f');
      // qcow2's data-file option: the data file the image is opened with, whatever its header says.
      const o = parseImageOpts(x);
      const dataFile = o['data-file.filename'] ?? o['data-file'];
      if (dataFile !== undefined) (openPolicy.dataFiles ??= new Map()).set(name, dataFile);
      return name;
    });
  }
  for (const x of operands) if (!imageOpts && nbdTargetOf(x)) special.set(x, (o) => import('./nbd-device.js').then((m) => m.openNbdImage(x, {}, o)));
  // info opens the image without its backing file, so QEMU refuses backing options there.
  if (cmd === 'info') {
    operands.forEach((name, i) => {
      const given = parsed.operands[i]!;
      let o: Record<string, string> | undefined;
      try {
        o = imageOpts ? parseImageOpts(given) : isJsonFilename(given) ? jsonFilenameOptions(given) : undefined;
      } catch {
        return; // (a json: name that does not parse fails when it is opened)
      }
      const refused = o && backingOptionsRefused(o, o.driver ?? 'raw');
      if (refused) special.set(name, () => Promise.reject(new QcowError(refused.code, refused.message, { file: given })));
    });
  }
  // QEMU's file protocol prefix names a plain file. A relative name left with a colon in its first
  // component would read as a protocol again, so QEMU shows (and resolves backing files from) it
  // as ./NAME: so do we (iotest 126).
  operands = operands.map((x) => {
    if (!x.startsWith('file:')) return x;
    const name = x.slice(5);
    return !name.startsWith('/') && name.split('/')[0]!.includes(':') ? `./${name}` : name;
  });
  if (cmd === 'resize' && resizeSize !== undefined) operands = [...operands, resizeSize];
  const file = operands[0];
  const style: FailureStyle = {
    program: PROGRAM,
    errorText: (e) => qemuErrorLines(PROGRAM, e, { op: contextOf(e), file: (e as QcowError)?.file ?? file }),
    json: qemuJson,
    // qemu-img exits 1 on every failure (check and compare report their findings otherwise).
    exitCode: () => 1,
  };
  const argv = [process.argv[0]!, PROGRAM, cmd, ...out, '--', ...operands];
  // QEMU refuses images whose bitmap directory it cannot load; qcow opens them so they can be
  // repaired, but qemu-img's scripts (and iotests) expect the refusal.
  openPolicy.refuseMalformedBitmaps = true;
  openPolicy.keyToResize = true;
  openPolicy.openName = (name) => {
    const own = special.get(name);
    if (own) return own;
    const json = isJsonFilename(name) ? jsonFilenameOptions(name) : undefined;
    if (json && nbdTargetOfOptions(json)) return (o) => import('./nbd-device.js').then((m) => m.openNbdImage(name, json, o));
    return jsonOpenerFor(name);
  };
  openPolicy.secrets = secrets;
  // Opening a lazy-refcounts image left dirty read-write repairs it; QEMU's check prints what it
  // repaired on standard error, whatever the command.
  openPolicy.onRepair = (messages) => process.stderr.write(messages.map((m) => m + '\n').join(''));
  // qcow2's corruption events, in its words, as QEMU prints them while the command runs.
  openPolicy.onCorruption = (e) => process.stderr.write(corruptionLine(e));
  openPolicy.onProbedRaw = (name) => process.stderr.write(probedRawWarning(name));
  // -p draws as qemu-img draws it: on standard output, terminal or not.
  progressStyle.qemu = true;
  process.exitCode = undefined;
  await runQcow(argv, style);
  return typeof process.exitCode === 'number' ? process.exitCode : 0;
}

/**
 * What qemu-img says before opening anything when -U cannot be honoured: image options that turn
 * force-share off, or a command that opens its image for writing (bench -w, check -r), which QEMU
 * refuses to share. Undefined when -U is absent or fine.
 */
function forceShareRefusal(cmd: string, parsed: Parsed, imageOpts: boolean): string | undefined {
  if (!parsed.options.some((o) => o.key === 'U')) return undefined;
  if (imageOpts && parsed.operands.some((x) => /^(?:off|no|false)$/.test(parseImageOpts(x)['force-share'] ?? ''))) return '--force-share/-U conflicts with image options';
  const writes = (cmd === 'bench' && parsed.options.some((o) => o.key === 'w')) || (cmd === 'check' && parsed.options.some((o) => o.key === 'r'));
  const file = parsed.operands[0];
  if (writes && file !== undefined) return `Could not open '${file}': force-share=on can only be used with read-only images`;
  return undefined;
}
