/**
 * `qemu-io` as qcow (compat/qemu-io): QEMU 7.2's options, command language, output and exit codes.
 * Commands come from -c (in order) or, without -c, from standard input line by line after a
 * `qemu-io> ` prompt (printed whether or not stdin is a terminal, as qemu-io does). The exit
 * status is 1 when the last failing command failed (any command failing), else 0.
 */
import { fstatSync, readFileSync, writeSync } from 'node:fs';
import { QcowError, type BlockDevice, type CorruptionEvent, type NodeOpenOptions } from '../../node.js';
import { getopt, type LongOption } from './getopt.js';
import { isOn, joinQcow2Options, overlapCheckOptions, qcow2OptionProblem } from './qcow2-options.js';
import { checkHostProtocol, isHostProtocol } from './protocol.js';
import { isJsonFilename, jsonFilenameOptions } from '../json-filename.js';
import { qemuJsonName } from '../json-name.js';
import { jsonOpenerFor } from '../json-open.js';
import { NULL_CO, isNullCoFilename, nullCoFileOptions, openNullCo, openNullCoFilename, openOverNullCo } from '../null-co.js';
import type { NbdTarget } from '../nbd-store.js';
import { COMPRESS, compressFilter } from './compress-filter.js';
import { withCopyOnRead } from '../../node.js';
import { QemuIo, parseOpts, unmapEnabled, type IoOutput, type Opener, type OpenRequest } from './engine.js';
import { corruptionLine } from '../corruption-line.js';
import { probedRawWarning } from '../probed-raw.js';
import { rawWindowOf, refusedAs } from '../raw-window.js';
import { backingOpenOptions } from '../backing-options.js';

const LONG: LongOption[] = [
  { name: 'help', hasArg: false, key: 'h' },
  { name: 'version', hasArg: false, key: 'V' },
  { name: 'cmd', hasArg: true, key: 'c' },
  { name: 'format', hasArg: true, key: 'f' },
  { name: 'read-only', hasArg: false, key: 'r' },
  { name: 'snapshot', hasArg: false, key: 's' },
  { name: 'nocache', hasArg: false, key: 'n' },
  { name: 'copy-on-read', hasArg: false, key: 'C' },
  { name: 'misalign', hasArg: false, key: 'm' },
  { name: 'native-aio', hasArg: false, key: 'k' },
  { name: 'aio', hasArg: true, key: 'i' },
  { name: 'discard', hasArg: true, key: 'd' },
  { name: 'cache', hasArg: true, key: 't' },
  { name: 'trace', hasArg: true, key: 'T' },
  { name: 'object', hasArg: true, key: 'object' },
  { name: 'image-opts', hasArg: false, key: 'image-opts' },
  { name: 'force-share', hasArg: false, key: 'U' },
];

function usage(name: string): string {
  return `Usage: ${name} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser (qcow)

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '${name} -c help' for information on available commands.
`;
}

/**
 * stdout as C's stdio keeps it: line-buffered on a terminal, otherwise fully buffered in 4 KiB
 * blocks and written when full, on fflush and at exit. stderr is written at once. Keeping this
 * matters: with both on one pipe, an error line lands before the results printed ahead of it,
 * exactly where qemu-io's lands.
 */
export class StdioOutput implements IoOutput {
  private buf = '';
  private readonly tty: boolean;
  constructor(
    private readonly write: (fd: number, text: string) => void = writeFd,
    tty?: boolean,
    private readonly block = 4096,
  ) {
    this.tty = tty ?? isTty(1);
  }
  out(text: string): void {
    this.buf += text;
    if (this.tty) {
      const nl = this.buf.lastIndexOf('\n');
      if (nl >= 0) {
        this.write(1, this.buf.slice(0, nl + 1));
        this.buf = this.buf.slice(nl + 1);
      }
    } else if (Buffer.byteLength(this.buf) >= this.block) {
      const bytes = Buffer.from(this.buf);
      const n = bytes.length - (bytes.length % this.block);
      this.write(1, bytes.subarray(0, n).toString());
      this.buf = bytes.subarray(n).toString();
    }
  }
  err(text: string): void {
    this.write(2, text);
  }
  flush(): void {
    if (this.buf) this.write(1, this.buf);
    this.buf = '';
  }
  discard(): void {
    this.buf = '';
  }
}

function isTty(fd: number): boolean {
  try {
    return fstatSync(fd).isCharacterDevice();
  } catch {
    return false;
  }
}

function writeFd(fd: number, text: string): void {
  const bytes = Buffer.from(text);
  for (let done = 0; done < bytes.length; ) {
    try {
      done += writeSync(fd, bytes, done, bytes.length - done);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EPIPE') return;
      if (code !== 'EAGAIN') throw e;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
    }
  }
}

/** --object secret,id=ID,data=TEXT|file=PATH: the secrets encrypted images name by id. */
function parseObject(text: string, secrets: Map<string, string>, output: IoOutput): boolean {
  const o = parseOpts(text, 'qom-type');
  if (o['qom-type'] !== 'secret') {
    output.err(`qemu-io: Invalid object type '${o['qom-type'] ?? ''}'\n`);
    return false;
  }
  if (!o.id) {
    output.err(`qemu-io: Parameter 'id' is missing\n`);
    return false;
  }
  if (o.data !== undefined) secrets.set(o.id, o.data);
  else if (o.file !== undefined) {
    try {
      secrets.set(o.id, readFileSync(o.file, 'utf8'));
    } catch {
      output.err(`qemu-io: Unable to read ${o.file}: No such file or directory\n`);
      return false;
    }
  } else {
    output.err("qemu-io: Either 'data' or 'file' must be provided\n");
    return false;
  }
  return true;
}

/**
 * qemu's qcow2 runtime options (cache sizes, overlap checks, lazy-refcounts...) are checked as
 * qemu checks them when it opens the image (./qcow2-options.ts); valid ones change nothing here.
 * The device is closed when they are refused.
 */
async function checked(dev: BlockDevice, o: Record<string, string>): Promise<BlockDevice> {
  const problem = dev.format === 'qcow2' ? qcow2OptionProblem(o, dev.clusterSize, dev.size) : undefined;
  if (problem === undefined) return dev;
  await dev.close();
  throw new QcowError('QCOW_INVALID_ARGUMENT', problem);
}

/** QEMU's copy-on-read filter driver (`driver=copy-on-read,file.driver=...`). */
const COPY_ON_READ = 'copy-on-read';

/** The options of the child `prefix` (`file.`) of a dotted option list, without the prefix. */
function childOf(o: Record<string, string>, prefix: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(o)) if (k.startsWith(prefix)) out[k.slice(prefix.length)] = v;
  return out;
}

/**
 * QEMU's stricter open rules, for every image qemu-io opens (see OpenOptions); and backing files
 * named in QEMU's own ways (json:{...}, blkdebug:...) open as QEMU opens them.
 */
const QEMU_OPEN_RULES = {
  refuseMalformedBitmaps: true,
  openBackingName: qemuBackingName,
} as const;

/** A backing file named in QEMU's ways, whose own backing files may be named so too. */
function qemuBackingName(name: string, o: { format: string | undefined; readOnly: boolean }): Promise<BlockDevice> | undefined {
  return jsonOpenerFor(name)?.({ ...o, refuseMalformedBitmaps: true, openBackingName: qemuBackingName });
}

/** Opens images for the engine: -o/--image-opts keys, secrets, -s overlays. */
export class NodeOpener implements Opener {
  private readonly overlays = new WeakMap<BlockDevice, string>();
  constructor(
    private readonly secrets: Map<string, string>,
    private readonly format?: string,
    /** Where the messages of a repair at open go (QEMU prints them on stderr while it opens). */
    private readonly onRepair?: (messages: readonly string[]) => void,
    /** Where qcow2's corruption events go as they are signalled (QEMU prints them on stderr then). */
    private readonly onCorruption?: (e: CorruptionEvent) => void,
    /** Where QEMU's warnings about a failed step of a request that went on go (stderr). */
    private readonly onWarning?: (message: string) => void,
  ) {}

  /** The open options that -o gives beyond the file's name, format and secrets. */
  private driverOptions(o: Record<string, string>, discard: string | undefined): Pick<NodeOpenOptions, 'lazyRefcounts' | 'overlapCheck' | 'onRepair' | 'onCorruption' | 'onWarning' | 'onProbedRaw' | 'discardPassthrough' | 'dataFile'> {
    const lazy = o['lazy-refcounts'];
    // qcow2's data-file: the external data file to use, whatever the header names (or if none).
    const dataFile = o['data-file.filename'] ?? o['data-file'];
    const pass = (k: string): boolean | undefined => (o[`pass-discard-${k}`] === undefined ? undefined : isOn(o[`pass-discard-${k}`]!));
    return {
      lazyRefcounts: lazy === undefined ? undefined : isOn(lazy),
      overlapCheck: overlapCheckOptions(o),
      onRepair: this.onRepair,
      onCorruption: this.onCorruption,
      onWarning: this.onWarning,
      onProbedRaw: this.onWarning && ((name) => this.onWarning!(probedRawWarning(name).replace(/\n$/, ''))),
      // pass-discard-request defaults to whether the image is opened with unmap (-d).
      discardPassthrough: { request: pass('request') ?? unmapEnabled(discard), snapshot: pass('snapshot'), other: pass('other') },
      dataFile,
    };
  }

  async open(req: OpenRequest): Promise<BlockDevice> {
    const o = req.name !== undefined && isJsonFilename(req.name) ? { ...jsonFilenameOptions(req.name), ...req.options } : req.options;
    if (o.driver === COPY_ON_READ) {
      // QEMU's copy-on-read filter: its `file` child is the image (which takes the filename), and
      // it needs to write to it.
      if (req.readOnly || o['read-only'] === 'on') throw new QcowError('QCOW_READ_ONLY', 'Block node is read-only');
      const child = childOf(o, 'file.');
      return withCopyOnRead(await this.open({ ...req, name: req.name !== undefined && isJsonFilename(req.name) ? undefined : req.name, copyOnRead: false, options: child }));
    }
    const dev = await this.openNode({ ...req, copyOnRead: false });
    if (!req.copyOnRead) return dev;
    try {
      return withCopyOnRead(dev);
    } catch (e) {
      await dev.close();
      throw e;
    }
  }

  private async openNode(req: OpenRequest): Promise<BlockDevice> {
    const { openImage, createImage } = await import('../../cli/open-images.js');
    // A json:{...} name is an option list; options given beside it are added to it.
    const json = req.name !== undefined && isJsonFilename(req.name);
    const o = json ? { ...jsonFilenameOptions(req.name!), ...req.options } : req.options;
    // null-co nodes are named as QEMU names them (json-name.ts).
    const nullName = (driver: string) => (json ? qemuJsonName(req.name!, driver) : undefined) ?? req.name ?? NULL_CO;
    // -U (or force-share=on): share every permission with other users of the file, so that a
    // running VM's write lock does not stop a look at its image. Only for a read-only open: a
    // writer that lets others write under it could not keep its metadata consistent.
    const forceShare = req.forceShare || (o['force-share'] !== undefined && isOn(o['force-share']));
    if (forceShare && !(req.readOnly || o['read-only'] === 'on')) throw new QcowError('QCOW_INVALID_ARGUMENT', 'force-share=on can only be used with read-only images');
    // -f comes before the options' driver, as in QEMU; but the open command's own -o driver=null-co
    // is the node asked for (QEMU's -f names only the image of the command line).
    if ((this.format ?? o.driver) === NULL_CO || req.options.driver === NULL_CO) return openNullCo(nullName(NULL_CO), o, req.readOnly || o['read-only'] === 'on');
    const nullFile = nullCoFileOptions(o);
    if (nullFile) return openOverNullCo(nullName('raw'), nullFile, this.format ?? o.driver, req.readOnly || o['read-only'] === 'on');
    if (!json && req.name !== undefined && isNullCoFilename(req.name)) return openNullCoFilename(req.name, this.format ?? o.driver, req.readOnly || o['read-only'] === 'on');
    if (o.driver === COMPRESS) {
      // A filter: its `file` child is the image, opened with the child's options.
      const child: Record<string, string> = {};
      for (const [k, v] of Object.entries(o)) if (k.startsWith('file.')) child[k.slice(5)] = v;
      return compressFilter(await this.open({ ...req, name: undefined, snapshot: false, options: child }));
    }
    // An NBD export (loaded only then: the client brings node:net into the start-up).
    if (o.driver === 'nbd' || o['file.driver'] === 'nbd' || (!json && req.name?.startsWith('nbd'))) {
      const { nbdTargetOf, nbdTargetOfOptions } = await import('../nbd-store.js');
      const nbd = nbdTargetOfOptions(o) ?? (json || req.name === undefined ? undefined : nbdTargetOf(req.name));
      if (nbd) return this.openNbd(req.name ?? 'nbd', nbd, o, req.readOnly || o['read-only'] === 'on');
    }
    // blkdebug as the image's file (`blkdebug:CONFIG:IMAGE`, file.driver=blkdebug): the format
    // opens over it, and its driver events reach blkdebug's rules.
    const blkdebugName = !json && req.name?.startsWith('blkdebug:') === true;
    if (o.driver === 'blkdebug') {
      // blkdebug above its image (a format, or the file itself): a filter device.
      const { blkdebugNameOptions, openBlkdebugFilter } = await import('../blkdebug/open.js');
      const node = { ...(blkdebugName ? blkdebugNameOptions(req.name!) : req.name !== undefined && !json ? { 'x-image': req.name } : {}), ...o };
      const readOnly = req.readOnly || o['read-only'] === 'on';
      return openBlkdebugFilter(req.name ?? 'blkdebug', node, (child) => this.open({ ...req, name: undefined, snapshot: false, readOnly, options: child }));
    }
    if ((blkdebugName && o.driver !== 'blkdebug') || o['file.driver'] === 'blkdebug') {
      const { blkdebugNameOptions, childOptions, openOverBlkdebug } = await import('../blkdebug/open.js');
      const node = { ...(blkdebugName ? blkdebugNameOptions(req.name!) : {}), ...childOptions(o, 'file.') };
      // The image's file name is blkdebug's own filename (`open -o file.driver=blkdebug IMG`: x-image).
      const given = o.filename ?? (json ? undefined : req.name);
      if (!blkdebugName && node.image === undefined && node['image.filename'] === undefined && given !== undefined) node['x-image'] = given;
      const display = req.name ?? `blkdebug:${node.config ?? ''}:${node['image.filename'] ?? node.image ?? node['x-image'] ?? ''}`;
      const readOnly = req.readOnly || o['read-only'] === 'on';
      const format = o.driver ?? this.format;
      return checked(await openOverBlkdebug(display, node, { format, readOnly, forceShare, ...QEMU_OPEN_RULES, ...this.driverOptions(o, req.discard) }), o);
    }
    const name = (json ? undefined : req.name) ?? o['file.filename'] ?? o.filename ?? o.file ?? o['file.file.filename'];
    if (name === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', "A block device must be specified for \"file\"");
    let format = o.driver ?? this.format;
    // A protocol driver named as the image's driver is a raw image over it.
    const protocol = isHostProtocol(format) ? format : o['file.driver'];
    if (isHostProtocol(protocol)) checkHostProtocol(protocol, name, req.readOnly || o['read-only'] === 'on');
    if (isHostProtocol(format)) format = 'raw';
    const { passwordsOf } = await import('../secrets.js');
    const layers = passwordsOf(o, this.secrets);
    let password = layers.password;
    if (password === undefined && this.secrets.size === 1) password = [...this.secrets.values()][0];
    const { passwordAt } = layers;
    const readOnly = req.readOnly || o['read-only'] === 'on';
    const noBacking = o.backing === 'null' || o.backing === '';
    const { backingFormat, backingFile, backingRawWindow } = backingOpenOptions(o);
    const fileDriver = o['file.driver'];
    if (fileDriver !== undefined && !isHostProtocol(fileDriver)) {
      // A nested image: the image's bytes are the guest content of another image.
      const innerName = o['file.file.filename'] ?? name;
      const inner = await openImage(innerName, { format: fileDriver, readOnly, forceShare, password, rawWindow: fileDriver === 'raw' ? rawWindowOf(o, 'file.') : undefined });
      const { defaultOpener } = await import('../../cli/open-images.js');
      const { openerWith } = await import('./device-store.js');
      try {
        return checked(await openImage(innerName, { format, readOnly, forceShare, password, noBacking, backingFormat, ...QEMU_OPEN_RULES, opener: openerWith(defaultOpener, innerName, inner) }), o);
      } catch (e) {
        await inner.close().catch(() => undefined);
        throw e;
      }
    }
    // A data file given as a blkdebug node (or raw over one): opened through it.
    const dataOpener = o['data-file.driver'] !== undefined ? (await import('../blkdebug/open.js')).dataFileOpener((await import('../../cli/open-images.js')).defaultOpener, o) : undefined;
    // raw's offset and size: a raw view of part of the file.
    const rawWindow = format === 'raw' ? rawWindowOf(o) : undefined;
    if (!req.snapshot) {
      const dev = openImage(name, { format, readOnly, forceShare, password, passwordAt, noBacking, backingFormat, backingFile, backingRawWindow, rawWindow, ...QEMU_OPEN_RULES, ...this.driverOptions(o, req.discard), ...(dataOpener ? { opener: dataOpener } : {}) });
      return checked(await (rawWindow ? dev.catch(refusedAs(req.name ?? name)) : dev), o);
    }
    // -s: a temporary qcow2 overlay over the image takes the writes and goes with close().
    const { tmpdir } = await import('node:os');
    const { join, resolve } = await import('node:path');
    const { mkdtemp } = await import('node:fs/promises');
    const base = await openImage(name, { format, readOnly: true, forceShare, password, passwordAt, noBacking, backingFormat, rawWindow, ...QEMU_OPEN_RULES });
    const baseFormat = base.format;
    await base.close();
    const dir = await mkdtemp(join(tmpdir(), 'qemu-io-snapshot-'));
    const tmp = join(dir, 'overlay.qcow2');
    await createImage(tmp, { format: 'qcow2', backingFile: resolve(name), backingFormat: baseFormat, password });
    const dev = await openImage(tmp, { readOnly, password, ...QEMU_OPEN_RULES });
    this.overlays.set(dev, dir);
    return dev;
  }

  /** An NBD export: a raw image over the connection (or the format named over it). */
  private async openNbd(name: string, target: NbdTarget, o: Record<string, string>, readOnly: boolean): Promise<BlockDevice> {
    const { openImage, defaultOpener } = await import('../../cli/open-images.js');
    const { NbdStore } = await import('../nbd-store.js');
    const { openerWithStore } = await import('../opener-with.js');
    const store = await NbdStore.connect(name, target, readOnly);
    const format = o.driver !== undefined && o.driver !== 'nbd' ? o.driver : this.format === 'nbd' || this.format === undefined ? 'raw' : this.format;
    try {
      return await openImage(name, { format, readOnly, ...QEMU_OPEN_RULES, opener: openerWithStore(defaultOpener, name, store) });
    } catch (e) {
      await store.close().catch(() => undefined);
      throw e;
    }
  }

  optionProblem(dev: BlockDevice, o: Record<string, string>): string | undefined {
    return dev.format === 'qcow2' ? qcow2OptionProblem(o, dev.clusterSize, dev.size) : undefined;
  }

  joinOptions(dev: BlockDevice, given: Record<string, string>, old: Record<string, string>): Record<string, string> {
    return dev.format === 'qcow2' ? joinQcow2Options(given, old) : { ...old, ...given };
  }

  async close(dev: BlockDevice): Promise<void> {
    try {
      await dev.close();
    } finally {
      const dir = this.overlays.get(dev);
      if (dir) {
        const { rm } = await import('node:fs/promises');
        await rm(dir, { recursive: true, force: true });
      }
    }
  }
}

const CACHE_MODES = ['none', 'off', 'writeback', 'writethrough', 'directsync', 'unsafe'];

/** Read stdin a line at a time (qemu-io's fgets loop), the prompt printed before each. */
async function* stdinLines(): AsyncGenerator<string> {
  const { createReadStream } = await import('node:fs');
  const stream = createReadStream('', { fd: 0, autoClose: false });
  let pending = '';
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    pending += chunk.toString('utf8');
    let nl: number;
    while ((nl = pending.indexOf('\n')) >= 0) {
      yield pending.slice(0, nl);
      pending = pending.slice(nl + 1);
    }
  }
  if (pending) yield pending;
}

export async function main(argv: string[]): Promise<void> {
  const prog = 'qemu-io';
  const output = new StdioOutput();
  const fail = (text: string) => {
    output.err(text);
    output.flush();
    process.exitCode = 1;
  };
  const parsed = getopt(prog, argv.slice(2), 'hVc:d:f:rsnCmki:t:T:U', LONG, (l) => output.err(l));
  if (!parsed) {
    output.out(usage(prog));
    output.flush();
    process.exitCode = 1;
    return;
  }
  const cmds: string[] = [];
  const secrets = new Map<string, string>();
  let format: string | undefined;
  let readOnly = false;
  let snapshot = false;
  let forceShare = false;
  let imageOpts = false;
  let cache: string | undefined;
  let discard: string | undefined;
  let copyOnRead = false;
  for (const { key, arg } of parsed.options) {
    switch (key) {
      case 'c':
        cmds.push(arg!);
        break;
      case 'f':
        format = arg;
        break;
      case 'r':
        readOnly = true;
        break;
      case 's':
        snapshot = true;
        break;
      case 'U':
        forceShare = true;
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'object':
        if (!parseObject(arg!, secrets, output)) return fail('');
        break;
      case 't':
        if (!CACHE_MODES.includes(arg!)) return fail(`${prog}: Invalid cache option: ${arg}\n`);
        cache = arg;
        break;
      case 'n':
        cache = 'none';
        break;
      case 'd':
        if (!['ignore', 'off', 'unmap', 'on'].includes(arg!)) return fail(`${prog}: Invalid discard option: ${arg}\n`);
        discard = arg;
        break;
      case 'i':
        if (!['threads', 'native', 'io_uring'].includes(arg!)) return fail(`${prog}: Invalid aio option: ${arg}\n`);
        break;
      case 'C':
        copyOnRead = true;
        break;
      case 'V':
        output.out(`${prog} version 7.2.0 (qcow ${process.env.npm_package_version ?? '0.1.0'})\n`);
        output.flush();
        return;
      case 'h':
        output.out(usage(prog));
        output.flush();
        return;
      default:
        // -n, -m, -k, -T: caching, misalignment, AIO and tracing change nothing here.
        break;
    }
  }
  if (parsed.operands.length > 1) {
    output.out(usage(prog));
    output.flush();
    process.exitCode = 1;
    return;
  }
  if (format !== undefined && imageOpts) return fail(`${prog}: --image-opts and -f are mutually exclusive\n`);

  const onRepair = (messages: readonly string[]) => output.err(messages.map((m) => m + '\n').join(''));
  const onCorruption = (e: CorruptionEvent) => output.err(corruptionLine(e));
  const io = new QemuIo(output, new NodeOpener(secrets, format, onRepair, onCorruption, (m) => output.err(`${m}\n`)), imageOpts, prog);
  if (parsed.operands.length === 1) {
    const operand = parsed.operands[0]!;
    const req: OpenRequest = imageOpts
      ? { options: parseOpts(operand, 'file'), readOnly, snapshot, forceShare, cache, discard, copyOnRead }
      : { name: operand, options: {}, readOnly, snapshot, forceShare, cache, discard, copyOnRead };
    if (await io.openImage(req)) {
      output.flush();
      process.exitCode = 1;
      return;
    }
  }

  let lastError = 0;
  let running: string | undefined;
  const run = async (line: string) => {
    running = line;
    const r = await io.command(line);
    running = undefined;
    if (r < 0) lastError = r;
  };
  // A command that waits on something nothing will ever settle (a request suspended at a blkdebug
  // breakpoint that only a later command would resume) leaves Node with an empty event loop: the
  // process would end silently with status 0. Say so and fail instead.
  const stuck = () => {
    if (running === undefined) return;
    output.err(`${prog}: '${running}' cannot complete: it waits for a request that nothing will resume\n`);
    output.flush();
    process.exitCode = 1;
  };
  process.once('beforeExit', stuck);
  if (cmds.length > 0) {
    for (const c of cmds) {
      if (io.quit) break;
      await run(c);
    }
  } else {
    const lines = stdinLines();
    while (!io.quit) {
      output.out(`${prog}> `);
      output.flush();
      const next = await lines.next();
      if (next.done) break;
      await run(next.value);
    }
  }
  try {
    await io.closeImage();
  } catch (e) {
    output.err(`${prog}: ${e instanceof Error ? e.message : String(e)}\n`);
  }
  output.flush();
  process.removeListener('beforeExit', stuck);
  process.exitCode = lastError < 0 ? 1 : 0;
}
