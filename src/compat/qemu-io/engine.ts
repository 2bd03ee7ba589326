/**
 * qemu-io's command language over a BlockDevice: every command of QEMU 7.2's qemu-io (read, write,
 * readv, writev, aio_read, aio_write, aio_flush, discard, alloc, map, length, info, truncate, flush,
 * open, close, reopen, sleep, sigraise, abort, help, quit, ...), with its options, its output lines
 * and its return values (negative: the command failed, and qemu-io will exit 1).
 *
 * The engine does no opening itself: `open`, `reopen` and `close` go through the `Opener` the
 * front end gives it, so the same engine runs under compat/qemu-io and `qcow io`.
 */
import { NULL_CO, isNullCoNode } from '../null-co.js';
import { boolProblem, GENERIC_BOOLS } from './qcow2-options.js';
import { CorruptionEvent, ImageMarkedCorrupt, QcowError, UnwrittenMetadata, type BlockDevice, type BlockExtent } from '../../node.js';
import { getopt } from './getopt.js';
import { qemuMessage } from '../messages.js';
import { breakpointsOf, type Breakpoints } from '../blkdebug/breakpoints.js';
import { ERRNO_TEXT, hexdump, nbdErrnoName, humanSize, numberError, parseNumber, parsePatternByte, report, type Num } from './text.js';
import { splitOptionItems } from '../../cli/option-list.js';
import { corruptionLine } from '../corruption-line.js';

/** Where the engine prints: stdout (buffered as C's stdio is) and stderr. */
export interface IoOutput {
  out(text: string): void;
  err(text: string): void;
  /** fflush(stdout). */
  flush(): void;
  /** Drop what stdout still buffers (abort(3) loses it). */
  discard?(): void;
}

/** How `open` (and the command line) asks for an image. */
export interface OpenRequest {
  /** The file name; absent when the options name it (--image-opts, `-o file.filename=...`). */
  name?: string;
  /** -o / --image-opts key=value options, as given. */
  options: Record<string, string>;
  readOnly: boolean;
  /** -s: writes go to a temporary overlay, dropped on close. */
  snapshot: boolean;
  forceShare: boolean;
  /**
   * The cache mode (-t, `open -t`, `reopen -c`). writethrough and directsync leave the image's
   * write cache off: every write is flushed before it completes (QEMU adds FUA to each).
   */
  cache?: string;
  /**
   * The discard mode (-d, `open -d`): with 'ignore' or 'off' QEMU opens the image without unmap,
   * so discards do nothing and zero writes never unmap (the default is 'unmap').
   */
  discard?: string;
  /** -C, `open -C`: reads copy what the backing chain supplies into the image (copy-on-read). */
  copyOnRead?: boolean;
}

/** Whether a discard mode lets discards and unmapping zero writes through (QEMU's BDRV_O_UNMAP). */
export function unmapEnabled(discard: string | undefined): boolean {
  return discard !== 'ignore' && discard !== 'off';
}

/**
 * Whether a cache mode leaves the write cache off (each write flushed, as QEMU's FUA). No mode
 * given (no -t, `open` without -t) is writethrough: qemu-io opens with the write cache off unless
 * told otherwise (the iotests pass `--cache writeback`).
 */
export function writeThrough(cache: string | undefined): boolean {
  return cache === undefined || cache === 'writethrough' || cache === 'directsync';
}

export interface Opener {
  open(req: OpenRequest): Promise<BlockDevice>;
  /** Close a device `open` gave (removes a -s overlay too). */
  close(dev: BlockDevice): Promise<void>;
  /** Why the format would refuse these runtime options (`reopen -o`), or undefined. */
  optionProblem?(dev: BlockDevice, options: Record<string, string>): string | undefined;
  /** The options a reopen gives the device: `given` joined with those it was opened with, as its format joins them (default: given over old). */
  joinOptions?(dev: BlockDevice, given: Record<string, string>, old: Record<string, string>): Record<string, string>;
}

type Errno = keyof typeof ERRNO_TEXT;

/** The errno a library failure stands for in QEMU's block layer. */
export function errnoOf(e: unknown): Errno {
  if (e instanceof ImageMarkedCorrupt) return 'ENOMEDIUM';
  if (e instanceof QcowError && e.errno !== undefined && e.errno in ERRNO_TEXT) return e.errno as Errno;
  if (e instanceof QcowError) {
    switch (e.code) {
      case 'QCOW_INVALID_ARGUMENT':
        return 'EINVAL';
      case 'QCOW_UNSUPPORTED':
        return 'ENOTSUP';
      case 'QCOW_READ_ONLY':
        return 'EPERM';
      case 'QCOW_NOT_FOUND':
        return 'ENOENT';
      case 'QCOW_LOCKED':
        return 'EBUSY';
      default:
        return 'EIO';
    }
  }
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code && code in ERRNO_TEXT) return code as Errno;
  if (code === 'EOPNOTSUPP') return 'ENOTSUP';
  // A request an NBD server failed (NbdClient): its error value is the errno, as QEMU reads it
  // (a server refuses a read of a fleecing snapshot's unbacked part with EINVAL, not EIO).
  const nbd = (e as { errno?: unknown } | undefined)?.errno;
  if (code === undefined && typeof nbd === 'number' && nbd > 0) return nbdErrnoName(nbd);
  return 'EIO';
}

const strerror = (e: unknown) => ERRNO_TEXT[errnoOf(e)];

/**
 * "<what> failed: <strerror>", as qemu-io prints a failed request; a corruption the request ran
 * into first gets qcow2's own line on standard error, as QEMU prints it when it marks the image.
 */
function failed(io: { output: { out(s: string): void; err(s: string): void } }, what: string, e: unknown): void {
  tellCorruption(io, e);
  io.output.out(`${what} failed: ${strerror(e)}\n`);
}

/**
 * qcow2's line for a corruption event that failed the request, if it was not printed when it was
 * signalled: "Marking image as corrupt" when it marked the image (open read-write), "Image is
 * corrupt" the first time otherwise.
 */
function tellCorruption(io: { output: { err(s: string): void } }, e: unknown): void {
  // Told already when it was signalled (the opener's OpenOptions.onCorruption prints it then).
  if (!(e instanceof CorruptionEvent) || e.told) return;
  if (e.fatal || !e.suppressed) io.output.err(corruptionLine(e));
}

/** Largest request qemu's block layer takes: INT_MAX rounded down to whole sectors. */
export const REQUEST_MAX = 2147483136;
const EINVAL = -22;
const EIO = -5;
const ENOMEDIUM = -123;

interface Command {
  name: string;
  alt?: string;
  argmin: number;
  argmax: number;
  args?: string;
  oneline: string;
  /** Works with no image open. */
  nofile?: boolean;
  /** Runs whatever the state (help, quit). */
  global?: boolean;
  /** Needs the image writable. */
  write?: boolean;
  help?: string;
  run: (io: QemuIo, argv: string[]) => Promise<number>;
}

/** A reason a request cannot reach the image, checked as qemu's block layer does (-EIO). */
function checkRange(dev: BlockDevice, offset: number, bytes: number): void {
  if (offset > dev.size || dev.size - offset < bytes) throw new QcowError('QCOW_OUT_OF_RANGE', 'beyond the end of the image');
}

/** `-C`/`-q` and friends: the flags getopt found. */
type Flags = Map<string, string | undefined>;

export class QemuIo {
  dev: BlockDevice | null = null;
  quit = false;
  /** The request the image was opened with (for reopen). */
  private request: OpenRequest | null = null;
  private readonly pending = new Set<Promise<void>>();

  constructor(
    readonly output: IoOutput,
    readonly opener: Opener,
    /** --image-opts was given: `open -o` is refused and a lone operand is an option list. */
    readonly imageOpts = false,
    readonly prog = 'qemu-io',
  ) {}

  private out(text: string): void {
    this.output.out(text);
  }
  /** error_report(): `qemu-io: message` on stderr. */
  report(text: string): void {
    this.output.err(`${this.prog}: ${text}\n`);
  }

  /** Open an image as the command line or `open` asks; prints qemu-io's message on failure. */
  async openImage(req: OpenRequest): Promise<number> {
    if (this.dev) {
      this.report("file open already, try 'help close'");
      return 1;
    }
    if (req.forceShare && req.options['force-share'] !== undefined && req.options['force-share'] !== 'on') {
      this.report('-U conflicts with image options');
      return 1;
    }
    try {
      this.dev = await this.opener.open(req);
      this.request = req;
      return 0;
    } catch (e) {
      // An option list names the image's file: a failure elsewhere (a backing file) is told apart from it.
      this.report(`can't open${req.name !== undefined ? ` device ${req.name}` : ''}: ${openErrorText(e, req.name ?? req.options['file.filename'])}`);
      return 1;
    }
  }

  async closeImage(): Promise<void> {
    // Requests still suspended at a blkdebug breakpoint would keep the drain waiting for ever.
    if (this.dev) breakpointsOf(this.dev.store)?.resumeAll();
    if (this.dev) breakpointsOf(this.dev)?.resumeAll();
    await this.drain();
    const dev = this.dev;
    this.dev = null;
    this.request = null;
    if (!dev) return;
    try {
      await this.opener.close(dev);
    } catch (e) {
      // qcow2's close reports the cache it could not write back, and the image is closed anyway.
      // A failed flush of the file itself goes unsaid: QEMU's close does not look at it.
      if (e instanceof QcowError && e.code === 'QCOW_IO' && !(e instanceof UnwrittenMetadata)) return;
      if (!(e instanceof UnwrittenMetadata)) throw e;
      for (const structure of e.structures) this.report(`Failed to flush the ${structure} cache: ${strerror(e)}`);
    }
  }

  /** Wait for every aio request in flight (aio_flush, close, exit). */
  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }

  /** aio requests in flight. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Resolves when any aio request in flight settles (at once when none is). */
  nextCompletion(): Promise<unknown> {
    return Promise.race([...this.pending, ...(this.pending.size === 0 ? [Promise.resolve()] : [])]);
  }

  /** Run one command line; returns its value (negative when it failed). */
  async command(line: string): Promise<number> {
    const argv = line.split(' ').filter((w) => w !== '');
    if (argv.length === 0) return 0;
    const ct = findCommand(argv[0]!);
    if (!ct) {
      this.output.err(`command "${argv[0]}" not found\n`);
      return EINVAL;
    }
    if (!ct.global && !ct.nofile && !this.dev) {
      this.output.err("no file open, try 'help open'\n");
      return EINVAL;
    }
    const n = argv.length - 1;
    if (n < ct.argmin || (ct.argmax !== -1 && n > ct.argmax)) {
      const cmd = argv[0]!;
      if (ct.argmax === -1) this.output.err(`bad argument count ${n} to ${cmd}, expected at least ${ct.argmin} arguments\n`);
      else if (ct.argmin === ct.argmax) this.output.err(`bad argument count ${n} to ${cmd}, expected ${ct.argmin} arguments\n`);
      else this.output.err(`bad argument count ${n} to ${cmd}, expected between ${ct.argmin} and ${ct.argmax} arguments\n`);
      return EINVAL;
    }
    if (ct.write && this.dev?.readOnly) {
      this.report('Block node is read-only');
      return -1;
    }
    try {
      return await ct.run(this, argv);
    } catch (e) {
      this.report(e instanceof Error ? e.message : String(e));
      return EIO;
    }
  }

  /** getopt for a command; on a bad option prints getopt's line and the command's usage. */
  opts(ct: Command, argv: string[], spec: string): { flags: Flags; list: { key: string; arg?: string }[]; args: string[] } | null {
    const r = getopt(argv[0]!, argv.slice(1), spec, [], (l) => this.output.err(l));
    if (!r) {
      this.usage(ct);
      return null;
    }
    const flags: Flags = new Map();
    for (const o of r.options) flags.set(o.key, o.arg);
    return { flags, list: r.options, args: r.operands };
  }

  usage(ct: Command): void {
    this.out(`${ct.name} ${ct.args ?? ''} -- ${ct.oneline}\n`);
  }

  /** cvtnum with qemu-io's message; null after printing it. */
  num(arg: string): number | null {
    const n: Num = parseNumber(arg);
    if ('error' in n) {
      this.out(numberError(n, arg));
      return null;
    }
    return n.value;
  }

  pattern(arg: string | undefined): number | null {
    const p = parsePatternByte(arg ?? '');
    if (p === null) this.out(`${arg} is not a valid pattern byte\n`);
    return p;
  }

  /** Lengths of readv/writev/aio: each and their sum within the request limit; null after a message. */
  lengths(args: string[]): number[] | null {
    const out: number[] = [];
    let total = 0;
    for (const a of args) {
      const n = this.num(a);
      if (n === null) return null;
      if (n > REQUEST_MAX) {
        this.out(`Argument '${a}' exceeds maximum size ${REQUEST_MAX}\n`);
        return null;
      }
      if (total > REQUEST_MAX - n) {
        this.out(`The total number of bytes exceed the maximum size ${REQUEST_MAX}\n`);
        return null;
      }
      out.push(n);
      total += n;
    }
    return out;
  }

  device(): BlockDevice {
    return this.dev!;
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    const dev = this.device();
    checkRange(dev, offset, buf.length);
    for (let done = 0; done < buf.length; ) {
      const n = Math.min(CHUNK, buf.length - done);
      await dev.read(offset + done, buf.subarray(done, done + n));
      done += n;
    }
  }

  async write(offset: number, buf: Uint8Array, fua: boolean): Promise<void> {
    const dev = this.device();
    fua ||= writeThrough(this.request?.cache);
    checkRange(dev, offset, buf.length);
    for (let done = 0; done < buf.length; ) {
      const n = Math.min(CHUNK, buf.length - done);
      await dev.write(offset + done, buf.subarray(done, done + n), fua ? { fua: true } : undefined);
      done += n;
    }
  }

  /** The VM state area (-b): qcow2's; other formats have none (QEMU: "Operation not supported"). */
  async readVmState(pos: number, buf: Uint8Array): Promise<void> {
    const dev = this.device();
    if (!dev.readVmState) throw new QcowError('QCOW_UNSUPPORTED', 'no VM state');
    await dev.readVmState(pos, buf);
  }

  async writeVmState(pos: number, buf: Uint8Array): Promise<void> {
    const dev = this.device();
    if (!dev.writeVmState) throw new QcowError('QCOW_UNSUPPORTED', 'no VM state');
    await dev.writeVmState(pos, buf).catch((e: unknown) => {
      // Past what the image can address: QEMU's EFBIG ("File too large").
      throw e instanceof QcowError && e.code === 'QCOW_OUT_OF_RANGE' ? Object.assign(new Error(e.message), { code: 'EFBIG' }) : e;
    });
    // A VM state write is no guest write (no FUA on it), but with the write cache off QEMU
    // flushes after it all the same (blk_save_vmstate).
    if (writeThrough(this.request?.cache)) await dev.flush();
  }

  async writeZeroes(offset: number, bytes: number, mayUnmap: boolean, fastOnly: boolean, fua: boolean): Promise<void> {
    const dev = this.device();
    fua ||= writeThrough(this.request?.cache);
    checkRange(dev, offset, bytes);
    // Opened without unmap, QEMU's block layer drops the request's may-unmap flag.
    mayUnmap &&= unmapEnabled(this.request?.discard);
    if (bytes > 0) await dev.writeZeroes(offset, bytes, { mayUnmap, fastOnly, fua });
  }

  requestOf(): OpenRequest | null {
    return this.request;
  }

  /** Reopen the image with another request (reopen -r/-w); the old device is flushed and closed first. */
  async reopen(req: OpenRequest): Promise<number> {
    await this.drain();
    const old = this.dev!;
    try {
      await old.flush();
      this.dev = null;
      await this.opener.close(old);
      this.dev = await this.opener.open(req);
      this.request = req;
      return 0;
    } catch (e) {
      this.report(e instanceof Error ? e.message : String(e));
      this.request = null;
      return EINVAL;
    }
  }

  /** `reopen -c`: the cache mode of the open image. */
  setCache(cache: string | undefined): void {
    if (this.request) this.request = { ...this.request, cache };
  }

  /** Start an aio request: its completion prints, whenever it comes. */
  track(p: Promise<void>): void {
    const t = p.finally(() => this.pending.delete(t));
    this.pending.add(t);
  }
}

const CHUNK = 32 * 1024 * 1024;
// process.hrtime, not performance.now(): the global `performance` loads perf_hooks and ten modules
// under it at its first use (~50 page faults of every qemu-io run, for a clock).
const now = () => Number(process.hrtime.bigint()) / 1e9;

/** The text after `can't open device X: ` for a failure to open, in QEMU's words where we know them. */
export function openErrorText(e: unknown, name: string | undefined): string {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'EACCES') return `Could not open '${name}': Permission denied`;
  if (!(e instanceof QcowError)) return e instanceof Error ? e.message : String(e);
  // The chain wraps a missing backing file; other failures of a backing image carry its name.
  const cause = e.cause;
  if (e.code === 'QCOW_NOT_FOUND' && cause instanceof QcowError && /^Could not open backing file/.test(e.message)) {
    return `Could not open backing file: ${layerText(cause, cause.file)}`;
  }
  // A missing external data file: QEMU names it as the image (or the user) does.
  const dataFile = /^Could not open data file '(.*)': No such file or directory$/.exec(e.message);
  if (e.code === 'QCOW_NOT_FOUND' && dataFile) return `Could not open '${dataFile[1]}': No such file or directory`;
  if (name !== undefined && e.file !== undefined && e.file !== name && !e.file.endsWith('/' + name.replace(/^\.\//, ''))) {
    return `Could not open backing file: ${layerText(e, e.file)}`;
  }
  return layerText(e, name);
}

function layerText(e: QcowError, file: string | undefined): string {
  if (e.code === 'QCOW_NOT_FOUND') return `Could not open '${file}': No such file or directory`;
  const unknown = /^Unknown file format '([^']*)'/.exec(e.message);
  if (unknown) return `Unknown driver '${unknown[1]}'`;
  return qemuMessage(e, { op: 'device', file });
}

function verify(buf: Uint8Array, pattern: number): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== pattern) return false;
  return true;
}

function concatLengths(lens: number[]): number {
  return lens.reduce((a, b) => a + b, 0);
}

/** Allocation of [offset, offset+bytes) in the top layer, merged into runs of equal state. */
async function allocationRuns(dev: BlockDevice, offset: number, bytes: number): Promise<{ offset: number; length: number; allocated: boolean }[]> {
  const runs: { offset: number; length: number; allocated: boolean }[] = [];
  if (bytes <= 0) return runs;
  const extents: BlockExtent[] = await dev.blockStatus(offset, bytes);
  for (const e of extents) {
    const last = runs[runs.length - 1];
    if (last && last.allocated === e.allocated && last.offset + last.length === e.offset) last.length += e.length;
    else runs.push({ offset: e.offset, length: e.length, allocated: e.allocated });
  }
  return runs;
}

const readCmd: Command = {
  name: 'read',
  alt: 'r',
  argmin: 2,
  argmax: -1,
  args: '[-abCqv] [-P pattern [-s off] [-l len]] off len',
  oneline: 'reads a number of bytes at a specified offset',
  help: `
 Reads LEN bytes at OFF, optionally checking them against a pattern or dumping them.
 -b  read from the VM state area instead of the disk
 -C  statistics in machine-readable form
 -l  length of the pattern-checked region (with -P)
 -p  accepted and ignored
 -P  check that every byte equals this pattern
 -q  no statistics
 -s  offset of the pattern-checked region within the read (with -P)
 -v  hexdump the data read

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'bCl:pP:qs:v');
    if (!o) return EINVAL;
    const { flags, args } = o;
    let pattern = 0;
    let pOff = 0;
    let pLen = 0;
    if (flags.has('l')) {
      const n = io.num(flags.get('l')!);
      if (n === null) return EINVAL;
      pLen = n;
    }
    if (flags.has('P')) {
      const p = io.pattern(flags.get('P'));
      if (p === null) return EINVAL;
      pattern = p;
    }
    if (flags.has('s')) {
      const n = io.num(flags.get('s')!);
      if (n === null) return EINVAL;
      pOff = n;
    }
    if (args.length !== 2) {
      io.usage(this);
      return EINVAL;
    }
    const offset = io.num(args[0]!);
    if (offset === null) return EINVAL;
    const count = io.num(args[1]!);
    if (count === null) return EINVAL;
    if (count > REQUEST_MAX) {
      io.output.out(`length cannot exceed ${REQUEST_MAX}, given ${args[1]}\n`);
      return EINVAL;
    }
    const P = flags.has('P');
    if (!P && (flags.has('l') || flags.has('s'))) {
      io.usage(this);
      return EINVAL;
    }
    if (!flags.has('l')) pLen = count - pOff;
    if (pLen < 0 || pLen + pOff > count) {
      io.output.out('pattern verification range exceeds end of read data\n');
      return EINVAL;
    }
    if (flags.has('b') && !sectorAligned(io, offset, count)) return EINVAL;
    const buf = new Uint8Array(count).fill(0xab);
    const t1 = now();
    try {
      if (flags.has('b')) await io.readVmState(offset, buf);
      else await io.read(offset, buf);
    } catch (e) {
      failed(io, 'read', e);
      return -1;
    }
    const t2 = now();
    let ret = 0;
    if (P && !verify(buf.subarray(pOff, pOff + pLen), pattern)) {
      io.output.out(`Pattern verification failed at offset ${offset + pOff}, ${pLen} bytes\n`);
      ret = EINVAL;
    }
    if (flags.has('q')) return ret;
    if (flags.has('v')) io.output.out(hexdump(buf, offset));
    io.output.out(report('read', t2 - t1, offset, count, count, 1, flags.has('C')));
    return ret;
  },
};

function sectorAligned(io: QemuIo, offset: number, count: number): boolean {
  if (offset % 512 !== 0) {
    io.output.out(`${offset} is not a sector-aligned value for 'offset'\n`);
    return false;
  }
  if (count % 512 !== 0) {
    io.output.out(`${count} is not a sector-aligned value for 'count'\n`);
    return false;
  }
  return true;
}

const readvCmd: Command = {
  name: 'readv',
  argmin: 2,
  argmax: -1,
  args: '[-Cqv] [-P pattern] off len [len..]',
  oneline: 'reads a number of bytes at a specified offset',
  help: `
 Reads into several buffers (one per LEN) from OFF.
 -C  statistics in machine-readable form
 -P  check that every byte equals this pattern
 -v  hexdump the data read
 -q  no statistics

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'CP:qv');
    if (!o) return EINVAL;
    const { flags, args } = o;
    let pattern = 0;
    if (flags.has('P')) {
      const p = io.pattern(flags.get('P'));
      if (p === null) return EINVAL;
      pattern = p;
    }
    if (args.length < 2) {
      io.usage(this);
      return EINVAL;
    }
    const offset = io.num(args[0]!);
    if (offset === null) return EINVAL;
    const lens = io.lengths(args.slice(1));
    if (!lens) return EINVAL;
    const size = concatLengths(lens);
    const buf = new Uint8Array(size).fill(0xab);
    const t1 = now();
    try {
      await io.read(offset, buf);
    } catch (e) {
      failed(io, 'readv', e);
      return -1;
    }
    const t2 = now();
    let ret = 0;
    if (flags.has('P') && !verify(buf, pattern)) {
      io.output.out(`Pattern verification failed at offset ${offset}, ${size} bytes\n`);
      ret = EINVAL;
    }
    if (flags.has('q')) return ret;
    if (flags.has('v')) io.output.out(hexdump(buf, offset));
    io.output.out(report('read', t2 - t1, offset, size, size, 1, flags.has('C')));
    return ret;
  },
};

/** A write buffer filled from a file, repeated to the length (write -s). Null after a message. */
async function bufferFromFile(io: QemuIo, file: string, count: number): Promise<Uint8Array | null> {
  const { readFile } = await import('node:fs/promises');
  let data: Uint8Array;
  try {
    data = await readFile(file);
  } catch (e) {
    io.output.err(`${file}: ${ERRNO_TEXT[errnoOf(e)]}\n`);
    return null;
  }
  if (data.length === 0) {
    io.output.err(`${file}: file is empty\n`);
    return null;
  }
  const buf = new Uint8Array(count);
  for (let o = 0; o < count; o += data.length) buf.set(data.subarray(0, Math.min(data.length, count - o)), o);
  return buf;
}

async function writeCompressed(io: QemuIo, offset: number, buf: Uint8Array): Promise<void> {
  const dev = io.device();
  checkRange(dev, offset, buf.length);
  if (!dev.writeCompressed) throw new QcowError('QCOW_UNSUPPORTED', 'compressed writes are not supported');
  const cs = dev.clusterSize;
  if (offset % cs !== 0 || (buf.length % cs !== 0 && offset + buf.length !== dev.size)) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', 'compressed writes must cover whole clusters');
  }
  for (let o = 0; o < buf.length; o += cs) await dev.writeCompressed(offset + o, buf.subarray(o, Math.min(o + cs, buf.length)));
}

const writeCmd: Command = {
  name: 'write',
  alt: 'w',
  argmin: 2,
  argmax: -1,
  write: true,
  args: '[-bcCfnquz] [-P pattern | -s source_file] off len',
  oneline: 'writes a number of bytes at a specified offset',
  help: `
 Writes LEN bytes at OFF, by default all 0xcd.
 -b  write to the VM state area instead of the disk
 -c  write compressed clusters
 -f  force unit access: durable when done
 -n  with -z, fail rather than write zero-filled buffers
 -p  accepted and ignored
 -P  fill with this byte
 -s  fill from this file (repeated)
 -C  statistics in machine-readable form
 -q  no statistics
 -u  with -z, the range may be deallocated
 -z  write zeroes

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'bcCfnpP:qs:uz');
    if (!o) return EINVAL;
    const { flags, args } = o;
    let pattern = 0xcd;
    if (flags.has('P')) {
      const p = io.pattern(flags.get('P'));
      if (p === null) return EINVAL;
      pattern = p;
    }
    if (args.length !== 2) {
      io.usage(this);
      return EINVAL;
    }
    const [b, c, f, n, u, z, s] = ['b', 'c', 'f', 'n', 'u', 'z', 's'].map((k) => flags.has(k));
    const say = (t: string) => (io.output.out(t + '\n'), EINVAL);
    if (b && z) return say('-b and -z cannot be specified at the same time');
    if (f && (b || c)) return say('-f and -b or -c cannot be specified at the same time');
    if (n && !z) return say('-n requires -z to be specified');
    if (u && !z) return say('-u requires -z to be specified');
    if (Number(z) + Number(flags.has('P')) + Number(s) > 1) return say('Only one of -z, -P, and -s can be specified at the same time');
    const offset = io.num(args[0]!);
    if (offset === null) return EINVAL;
    const count = io.num(args[1]!);
    if (count === null) return EINVAL;
    if (count > REQUEST_MAX && !n) return say(`length cannot exceed ${REQUEST_MAX} without -n, given ${args[1]}`);
    if ((b || c) && !sectorAligned(io, offset, count)) return EINVAL;
    let buf: Uint8Array | null = null;
    if (!z) {
      buf = s ? await bufferFromFile(io, flags.get('s')!, count) : new Uint8Array(count).fill(pattern);
      if (!buf) return EINVAL;
    }
    const t1 = now();
    try {
      if (b) await io.writeVmState(offset, buf!);
      else if (z) await io.writeZeroes(offset, count, u, n, f);
      else if (c) await writeCompressed(io, offset, buf!);
      else await io.write(offset, buf!, f);
    } catch (e) {
      failed(io, 'write', e);
      return -1;
    }
    const t2 = now();
    if (!flags.has('q')) io.output.out(report('wrote', t2 - t1, offset, count, count, 1, flags.has('C')));
    return 0;
  },
};

const writevCmd: Command = {
  name: 'writev',
  argmin: 2,
  argmax: -1,
  write: true,
  args: '[-Cfq] [-P pattern] off len [len..]',
  oneline: 'writes a number of bytes at a specified offset',
  help: `
 Writes from several buffers (one per LEN) at OFF, by default all 0xcd.
 -P  fill with this byte
 -C  statistics in machine-readable form
 -f  force unit access: durable when done
 -q  no statistics

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'CfqP:');
    if (!o) return EINVAL;
    const { flags, args } = o;
    let pattern = 0xcd;
    if (flags.has('P')) {
      const p = io.pattern(flags.get('P'));
      if (p === null) return EINVAL;
      pattern = p;
    }
    if (args.length < 2) {
      io.usage(this);
      return EINVAL;
    }
    const offset = io.num(args[0]!);
    if (offset === null) return EINVAL;
    const lens = io.lengths(args.slice(1));
    if (!lens) return EINVAL;
    const size = concatLengths(lens);
    const t1 = now();
    try {
      await io.write(offset, new Uint8Array(size).fill(pattern), flags.has('f'));
    } catch (e) {
      failed(io, 'writev', e);
      return -1;
    }
    const t2 = now();
    if (!flags.has('q')) io.output.out(report('wrote', t2 - t1, offset, size, size, 1, flags.has('C')));
    return 0;
  },
};

const aioReadCmd: Command = {
  name: 'aio_read',
  argmin: 2,
  argmax: -1,
  args: '[-Ciqv] [-P pattern] off len [len..]',
  oneline: 'asynchronously reads a number of bytes',
  help: `
 Starts a read into several buffers (one per LEN) from OFF and returns at once; its result is
 printed when it completes (aio_flush waits for every request in flight).
 -C  statistics in machine-readable form
 -P  check that every byte equals this pattern
 -i  count an invalid request (statistics only)
 -v  hexdump the data read
 -q  no statistics

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'CP:iqv');
    if (!o) return EINVAL;
    const { flags, args } = o;
    let pattern = 0;
    if (flags.has('P')) {
      const p = io.pattern(flags.get('P'));
      if (p === null) return EINVAL;
      pattern = p;
    }
    if (flags.has('i')) {
      io.output.out('injecting invalid read request\n');
      return 0;
    }
    if (args.length < 2) {
      io.usage(this);
      return EINVAL;
    }
    const offset = io.num(args[0]!);
    if (offset === null) return EINVAL;
    const lens = io.lengths(args.slice(1));
    if (!lens) return EINVAL;
    const size = concatLengths(lens);
    const buf = new Uint8Array(size).fill(0xab);
    const t1 = now();
    io.track(
      io.read(offset, buf).then(
        () => {
          const t2 = now();
          if (flags.has('P') && !verify(buf, pattern)) io.output.out(`Pattern verification failed at offset ${offset}, ${size} bytes\n`);
          if (flags.has('q')) return;
          if (flags.has('v')) io.output.out(hexdump(buf, offset));
          io.output.out(report('read', t2 - t1, offset, size, size, 1, flags.has('C')));
        },
        (e: unknown) => failed(io, 'readv', e),
      ),
    );
    return 0;
  },
};

const aioWriteCmd: Command = {
  name: 'aio_write',
  argmin: 2,
  argmax: -1,
  write: true,
  args: '[-Cfiquz] [-P pattern] off len [len..]',
  oneline: 'asynchronously writes a number of bytes',
  help: `
 Starts a write from several buffers (one per LEN) at OFF and returns at once; its result is
 printed when it completes (aio_flush waits for every request in flight).
 -P  fill with this byte
 -C  statistics in machine-readable form
 -f  force unit access: durable when done
 -i  count an invalid request (statistics only)
 -q  no statistics
 -u  with -z, the range may be deallocated
 -z  write zeroes

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'CfiqP:uz');
    if (!o) return EINVAL;
    const { flags, args } = o;
    let pattern = 0xcd;
    if (flags.has('P')) {
      const p = io.pattern(flags.get('P'));
      if (p === null) return EINVAL;
      pattern = p;
    }
    if (flags.has('i')) {
      io.output.out('injecting invalid write request\n');
      return 0;
    }
    if (args.length < 2) {
      io.usage(this);
      return EINVAL;
    }
    const z = flags.has('z');
    const say = (t: string) => (io.output.out(t + '\n'), EINVAL);
    if (z && args.length !== 2) return say('-z supports only a single length parameter');
    if (flags.has('u') && !z) return say('-u requires -z to be specified');
    // qemu 7.2 never sets its own -P flag for aio_write, so -z with -P is not refused there either.
    const offset = io.num(args[0]!);
    if (offset === null) return EINVAL;
    const C = flags.has('C');
    const q = flags.has('q');
    const fua = flags.has('f');
    const done = (size: number, t1: number) => () => {
      if (!q) io.output.out(report('wrote', now() - t1, offset, size, size, 1, C));
    };
    const aioFailed = (e: unknown) => failed(io, 'aio_write', e);
    if (z) {
      const count = io.num(args[1]!);
      if (count === null) return EINVAL;
      const t1 = now();
      io.track(io.writeZeroes(offset, count, flags.has('u'), false, fua).then(done(count, t1), aioFailed));
      return 0;
    }
    const lens = io.lengths(args.slice(1));
    if (!lens) return EINVAL;
    const size = concatLengths(lens);
    const t1 = now();
    io.track(io.write(offset, new Uint8Array(size).fill(pattern), fua).then(done(size, t1), aioFailed));
    return 0;
  },
};

const discardCmd: Command = {
  name: 'discard',
  alt: 'd',
  argmin: 2,
  argmax: -1,
  write: true,
  args: '[-Cq] off len',
  oneline: 'discards a number of bytes at a specified offset',
  help: `
 Discards LEN bytes at OFF.
 -C  statistics in machine-readable form
 -q  no statistics

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'Cq');
    if (!o) return EINVAL;
    const { flags, args } = o;
    if (args.length !== 2) {
      io.usage(this);
      return EINVAL;
    }
    const offset = io.num(args[0]!);
    if (offset === null) return EINVAL;
    const bytes = io.num(args[1]!);
    if (bytes === null) return EINVAL;
    if (bytes > REQUEST_MAX) {
      io.output.out(`length cannot exceed ${REQUEST_MAX}, given ${args[1]}\n`);
      return EINVAL;
    }
    const t1 = now();
    try {
      const dev = io.device();
      checkRange(dev, offset, bytes);
      // Opened without unmap (-d ignore/off), QEMU's block layer lets a discard succeed unseen.
      if (bytes > 0 && unmapEnabled(io.requestOf()?.discard)) await dev.discard(offset, bytes);
    } catch (e) {
      failed(io, 'discard', e);
      return -1;
    }
    const t2 = now();
    if (!flags.has('q')) io.output.out(report('discard', t2 - t1, offset, bytes, bytes, 1, flags.has('C')));
    return 0;
  },
};

const allocCmd: Command = {
  name: 'alloc',
  alt: 'a',
  argmin: 1,
  argmax: 2,
  args: 'offset [count]',
  oneline: 'checks if offset is allocated in the file',
  async run(io, argv) {
    const start = io.num(argv[1]!);
    if (start === null) return EINVAL;
    let count = 512;
    if (argv.length === 3) {
      const n = io.num(argv[2]!);
      if (n === null) return EINVAL;
      count = n;
    }
    const dev = io.device();
    // Past the end of the image there is nothing to ask about: the count shrinks, as qemu's does.
    count = Math.max(0, Math.min(count, dev.size - start));
    let sum = 0;
    try {
      for (const r of await allocationRuns(dev, start, count)) if (r.allocated) sum += r.length;
    } catch (e) {
      failed(io, 'is_allocated', e);
      return -1;
    }
    io.output.out(`${sum}/${count} bytes allocated at offset ${humanSize(start)}\n`);
    return 0;
  },
};

const mapCmd: Command = {
  name: 'map',
  argmin: 0,
  argmax: 0,
  args: '',
  oneline: 'prints the allocated areas of a file',
  async run(io) {
    const dev = io.device();
    // qemu-io asks for the length first; an image given up on (marked corrupt) has none.
    if (dev.unusable) {
      io.report(`Failed to query image length: ${strerror(dev.unusable)}`);
      return -1;
    }
    const { runs, error } = await mapRuns(dev);
    for (const r of runs) {
      io.output.out(
        `${humanSize(r.length)} (0x${r.length.toString(16)}) bytes ${r.allocated ? '    allocated' : 'not allocated'} at offset ${humanSize(r.offset)} (0x${r.offset.toString(16)})\n`,
      );
    }
    if (error !== undefined) {
      tellCorruption(io, error);
      io.report(`Failed to get allocation status: ${strerror(error)}`);
      return -1;
    }
    return 0;
  },
};

/**
 * The allocation runs `map` prints, and the error that stopped it, if one did. qemu-io asks the
 * block layer run by run and prints each before asking for the next, so a range whose status
 * fails (a corrupt L2 table) ends the listing there, after what came before it: asked again in
 * steps no larger than an L2 table's reach (an extended one's, a divisor of a plain one's), the
 * runs before the failing step are found.
 */
async function mapRuns(dev: BlockDevice): Promise<{ runs: { offset: number; length: number; allocated: boolean }[]; error?: unknown }> {
  try {
    return { runs: await allocationRuns(dev, 0, dev.size) };
  } catch (e) {
    const cs = dev.clusterSize;
    const step = Math.max(cs, (cs * cs) / 16);
    const runs: { offset: number; length: number; allocated: boolean }[] = [];
    for (let at = 0; at < dev.size; at += step) {
      let part;
      try {
        part = await allocationRuns(dev, at, Math.min(step, dev.size - at));
      } catch {
        // The first error is the one told: a corruption event is signalled once.
        return { runs, error: e };
      }
      for (const r of part) {
        const last = runs[runs.length - 1];
        if (last && last.allocated === r.allocated && last.offset + last.length === r.offset) last.length += r.length;
        else runs.push(r);
      }
    }
    return { runs, error: e };
  }
}

const lengthCmd: Command = {
  name: 'length',
  alt: 'l',
  argmin: 0,
  argmax: 0,
  oneline: 'gets the length of the current file',
  async run(io) {
    const dev = io.device();
    if (dev.unusable) {
      io.output.out(`getlength: ${strerror(dev.unusable)}\n`);
      return -1;
    }
    io.output.out(`${humanSize(dev.size)}\n`);
    return 0;
  },
};

/** Format-specific data as qemu's human dump prints it: `key: value`, nested maps indented. */
function dumpSpecific(data: Record<string, unknown>, indent: number): string {
  let out = '';
  const pad = ' '.repeat(indent);
  for (const [k, v] of Object.entries(data)) {
    const key = k.replace(/-/g, ' ');
    if (Array.isArray(v)) {
      out += `${pad}${key}:\n`;
      for (const item of v) {
        if (item && typeof item === 'object') {
          const inner = dumpSpecific(item as Record<string, unknown>, indent + 8);
          out += `${pad}    [${v.indexOf(item)}]:\n${inner}`;
        } else out += `${pad}    [${v.indexOf(item)}]: ${String(item)}\n`;
      }
    } else if (v && typeof v === 'object') {
      out += `${pad}${key}:\n` + dumpSpecific(v as Record<string, unknown>, indent + 4);
    } else out += `${pad}${key}: ${String(v)}\n`;
  }
  return out;
}

const infoCmd: Command = {
  name: 'info',
  alt: 'i',
  argmin: 0,
  argmax: 0,
  oneline: 'prints information about the current file',
  async run(io) {
    const dev = io.device();
    // An image given up on (marked corrupt) has no driver left to describe it: qemu-io 7.2
    // fails the command without a word.
    if (dev.unusable) return ENOMEDIUM;
    io.output.out(`format name: ${dev.format}\n`);
    if (isNullCoNode(dev)) {
      // null-co has no driver info: qemu-io 7.2 prints the name a second time and fails the
      // command without a message (seen with the real program; iotest 133 expects it). Raw over
      // it asks the node for its info and fails the same way, its name printed once.
      if (dev.format === NULL_CO) io.output.out(`format name: ${dev.format}\n`);
      return -95;
    }
    const d = await dev.describe();
    const cs = d.clusterSize ?? 0;
    // qcow2 keeps the VM state right after the guest range its L1 table can address (the
    // device knows the span of an L2 table: extended L2 entries are twice as wide).
    const vmState = dev.format === 'qcow2' ? (dev as { vmStateOffset?: number }).vmStateOffset ?? 0 : 0;
    io.output.out(`cluster size: ${humanSize(cs)}\n`);
    io.output.out(`vm state offset: ${humanSize(vmState)}\n`);
    if (d.formatSpecific) io.output.out('Format specific information:\n' + dumpSpecific(d.formatSpecific.data, 4));
    return 0;
  },
};

const truncateCmd: Command = {
  name: 'truncate',
  alt: 't',
  argmin: 1,
  argmax: 3,
  write: true,
  args: '[-m prealloc_mode] off',
  oneline: 'truncates the current file at the given offset',
  async run(io, argv) {
    const o = io.opts(this, argv, 'm:');
    if (!o) return EINVAL;
    const mode = o.flags.get('m') ?? 'off';
    if (!['off', 'metadata', 'falloc', 'full'].includes(mode)) {
      io.report(`Invalid preallocation mode '${mode}'`);
      return EINVAL;
    }
    const size = io.num(o.args[0] ?? '');
    if (size === null) return EINVAL;
    const dev = io.device();
    if (dev.unusable) {
      // blk_truncate's words for a node without a driver (before the driver could refuse the mode).
      io.report('No medium inserted');
      return ENOMEDIUM;
    }
    if (mode !== 'off') {
      io.report(`Unsupported preallocation mode '${mode}'`);
      return -95;
    }
    if (!dev.resize) {
      io.report('Image format driver does not support resize');
      return -95;
    }
    try {
      await dev.resize(size, { shrink: true });
    } catch (e) {
      io.report(e instanceof Error ? e.message : String(e));
      return -1;
    }
    return 0;
  },
};

const flushCmd: Command = {
  name: 'flush',
  alt: 'f',
  argmin: 0,
  argmax: 0,
  oneline: 'flush all in-core file state to disk',
  async run(io) {
    try {
      await io.device().flush();
    } catch {
      return EIO;
    }
    return 0;
  },
};

const aioFlushCmd: Command = {
  name: 'aio_flush',
  argmin: 0,
  argmax: 0,
  oneline: 'completes all outstanding aio requests',
  async run(io) {
    await io.drain();
    return 0;
  },
};

/** Parses `-o` option lists (`a=b,c=d`, `,,` for a comma); a bare word is `name=on` or, first, the implied key. */
export function parseOpts(text: string, implied?: string): Record<string, string> {
  const out: Record<string, string> = {};
  const parts = splitOptionItems(text);
  parts.forEach((p, i) => {
    const eq = p.indexOf('=');
    if (eq < 0) {
      if (i === 0 && implied) out[implied] = p;
      else if (p.startsWith('no') && p.length > 2) out[p.slice(2)] = 'off';
      else if (p !== '') out[p] = 'on';
    } else out[p.slice(0, eq)] = p.slice(eq + 1);
  });
  return out;
}

const CACHE_MODES = ['none', 'off', 'writeback', 'writethrough', 'directsync', 'unsafe'];

const openCmd: Command = {
  name: 'open',
  alt: 'o',
  argmin: 1,
  argmax: -1,
  nofile: true,
  args: '[-rsCnkU] [-t cache] [-d discard] [-o options] [path]',
  oneline: 'open the file specified by path',
  help: `
 Opens an image for the other commands.
 -r  read-only
 -s  writes go to a temporary overlay, dropped on close
 -C  copy-on-read
 -n  no host cache (same as -t none)
 -U  share the image with other writers
 -k  native AIO (accepted)
 -i  AIO mode (accepted)
 -t  cache mode
 -d  discard mode
 -o  options for the image (driver=..., file.filename=..., ...)

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'snCro:ki:t:d:U');
    if (!o) return EINVAL;
    const { flags, args } = o;
    let options: Record<string, string> = {};
    for (const [k, v] of flags) {
      if (k === 't' && !CACHE_MODES.includes(v!)) {
        io.report(`Invalid cache option: ${v}`);
        return EINVAL;
      }
      if (k === 'd' && !['ignore', 'off', 'unmap', 'on'].includes(v!)) {
        io.report(`Invalid discard option: ${v}`);
        return EINVAL;
      }
      if (k === 'i' && !['threads', 'native', 'io_uring'].includes(v!)) {
        io.report(`Invalid aio option: ${v}`);
        return EINVAL;
      }
    }
    // Every -o is merged, in order.
    for (const opt of o.list) {
      if (opt.key !== 'o') continue;
      if (io.imageOpts) {
        io.output.out("--image-opts and 'open -o' are mutually exclusive\n");
        return EINVAL;
      }
      options = { ...options, ...parseOpts(opt.arg!) };
    }
    let name: string | undefined;
    if (io.imageOpts && args.length === 1) {
      options = { ...options, ...parseOpts(args[0]!) };
    } else if (args.length === 1) name = args[0];
    else if (args.length > 1) {
      io.usage(this);
      return EINVAL;
    }
    const cache = flags.has('n') ? 'none' : flags.get('t');
    const r = await io.openImage({ name, options, readOnly: flags.has('r'), snapshot: flags.has('s'), forceShare: flags.has('U'), cache, discard: flags.get('d'), copyOnRead: flags.has('C') });
    return r ? EINVAL : 0;
  },
};

const closeCmd: Command = {
  name: 'close',
  alt: 'c',
  argmin: 0,
  argmax: 0,
  oneline: 'close the current open file',
  async run(io) {
    await io.closeImage();
    return 0;
  },
};

const reopenCmd: Command = {
  name: 'reopen',
  argmin: 0,
  argmax: -1,
  args: '[(-r|-w)] [-c cache] [-o options]',
  oneline: 'reopens an image with new options',
  help: `
 Changes how the open image is opened.
 -r  read-only
 -w  read-write
 -c  cache mode
 -o  options (read-only=on|off, ...)

`,
  async run(io, argv) {
    const o = io.opts(this, argv, 'c:o:rw');
    if (!o) return EINVAL;
    const { flags, args } = o;
    if (flags.has('r') && flags.has('w')) {
      io.report('Only one -r/-w option may be given');
      return EINVAL;
    }
    if (flags.has('c') && !CACHE_MODES.includes(flags.get('c')!)) {
      io.report(`Invalid cache option: ${flags.get('c')}`);
      return EINVAL;
    }
    if (args.length !== 0) {
      io.usage(this);
      return EINVAL;
    }
    const opts = flags.has('o') ? (parseOpts(flags.get('o')!) as Record<string, string>) : {};
    const current = io.requestOf();
    let readOnly = io.device().readOnly;
    if (opts['read-only'] !== undefined) {
      if (flags.has('r') || flags.has('w')) {
        io.report("Cannot set both -r/-w and 'read-only'");
        return EINVAL;
      }
    }
    if ((opts['cache.direct'] !== undefined || opts['cache.no-flush'] !== undefined) && flags.has('c')) {
      io.report('Cannot set both -c and the cache options');
      return EINVAL;
    }
    const { 'read-only': _ro, ...rest } = opts;
    // What the node would be reopened with: checked whole before the open device is let go, as
    // QEMU's reopen prepares the new state before it commits (a refusal leaves the image open).
    const joined = current ? (io.opener.joinOptions?.(io.device(), rest, current.options) ?? { ...current.options, ...rest }) : rest;
    const problem = boolProblem(opts, GENERIC_BOOLS) ?? (current ? io.opener.optionProblem?.(io.device(), joined) : undefined) ?? (current ? fixedOptionProblem(io.device(), current.options, opts) : undefined);
    if (problem !== undefined) {
      io.report(problem);
      return EINVAL;
    }
    if (opts['read-only'] !== undefined) {
      readOnly = ['on', 'yes', 'true', 'y'].includes(opts['read-only']);
    } else if (flags.has('r')) readOnly = true;
    else if (flags.has('w')) readOnly = false;
    if (!current) return 0;
    const cache = flags.get('c') ?? current.cache;
    // Options other than read-only that change how the image is driven (lazy-refcounts) take a
    // reopen; the cache mode only changes how writes are issued.
    const changed = Object.keys({ ...joined, ...current.options }).some((k) => current.options[k] !== joined[k]);
    if (readOnly === io.device().readOnly && !changed) {
      io.setCache(cache);
      return 0;
    }
    return io.reopen({ ...current, options: joined, readOnly, cache });
  },
};

/**
 * The options a reopen may not change (QEMU: "Cannot change the option"): a node's name and
 * driver, at the top or of its file or backing child. Given again with the value they have (set
 * at open, or the driver in use), they are fine.
 */
function fixedOptionProblem(dev: BlockDevice, opened: Record<string, string>, wanted: Record<string, string>): string | undefined {
  const drivers: Record<string, string | undefined> = { driver: dev.format, 'file.driver': 'file', 'backing.driver': dev.backing?.format };
  for (const [key, value] of Object.entries(wanted)) {
    const leaf = key.slice(key.lastIndexOf('.') + 1);
    if (leaf !== 'node-name' && leaf !== 'driver') continue;
    const current = opened[key] ?? (leaf === 'driver' ? drivers[key] : undefined);
    if (current !== value) return `Cannot change the option '${leaf}'`;
  }
  return undefined;
}

const sleepCmd: Command = {
  name: 'sleep',
  argmin: 1,
  argmax: 1,
  nofile: true,
  oneline: 'waits for the given value in milliseconds',
  async run(io, argv) {
    const m = /^[ \t]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(argv[1]!);
    const ms = m ? (m[1] === '-' ? -1 : /^0[xX]/.test(m[2]!) ? Number.parseInt(m[2]!.slice(2), 16) : m[2]!.length > 1 && m[2]![0] === '0' ? Number.parseInt(m[2]!, 8) : Number(m[2])) : -1;
    if (ms < 0) {
      io.output.out(`${argv[1]} is not a valid number\n`);
      return EINVAL;
    }
    await new Promise((r) => setTimeout(r, ms));
    return 0;
  },
};

const sigraiseCmd: Command = {
  name: 'sigraise',
  argmin: 1,
  argmax: 1,
  nofile: true,
  args: 'signal',
  oneline: 'raises a signal',
  help: `
 Sends the given signal (a number) to qemu-io itself, e.g. 9 to kill it as a crash would.

`,
  async run(io, argv) {
    const sig = io.num(argv[1]!);
    if (sig === null) return EINVAL;
    if (sig > 65) {
      io.output.out(`signal argument '${argv[1]}' is too large to be a valid signal\n`);
      return EINVAL;
    }
    io.output.flush();
    if (sig > 0) {
      try {
        process.kill(process.pid, sig);
      } catch {
        // Not a signal this system has: nothing is raised, as raise(3) fails.
      }
      // Let the signal land before the next command runs.
      await new Promise((r) => setTimeout(r, 20));
    }
    return 0;
  },
};

const abortCmd: Command = {
  name: 'abort',
  argmin: 0,
  argmax: 0,
  nofile: true,
  oneline: 'simulate a program crash using abort(3)',
  async run(io) {
    io.output.discard?.();
    process.abort();
  },
};

/**
 * The blkdebug node qemu-io's break/resume/... act on, as QEMU looks for it: the device itself
 * when it is a blkdebug filter, else its file (a format over blkdebug). None: ENOTSUP.
 */
function breakpointsFor(io: QemuIo): Breakpoints | undefined {
  const dev = io.device();
  const bp = breakpointsOf(dev) ?? breakpointsOf(dev.store);
  // QEMU's blkdebug prints its lines on stdout, between qemu-io's own.
  if (bp) bp.say = (line) => io.output.out(line);
  return bp;
}

const debugCmd = (name: string, argmin: number, args: string, oneline: string, act: (io: QemuIo, bp: Breakpoints, a: string[]) => Promise<string>, fail: (a: string[]) => string): Command => ({
  name,
  argmin,
  argmax: argmin,
  args,
  oneline,
  async run(io, argv) {
    const bp = breakpointsFor(io);
    // No blkdebug node: wait_break has nothing to wait for (QEMU would wait for ever).
    if (!bp && name === 'wait_break') return 0;
    const errno = bp ? await act(io, bp, argv) : 'ENOTSUP';
    if (errno === '') return 0;
    io.output.out(fail(argv) + `: ${ERRNO_TEXT[errno as Errno]}\n`);
    return errno === 'ENOENT' ? -2 : -95;
  },
});

const breakCmd = debugCmd(
  'break',
  2,
  'event tag',
  'sets a breakpoint on event and tags the stopped request as tag',
  async (_io, bp, a) => (bp.breakpoint(a[1]!, a[2]!) ? '' : 'ENOENT'),
  () => 'Could not set breakpoint',
);
const removeBreakCmd = debugCmd('remove_break', 1, 'tag', 'remove a breakpoint by tag', async (_io, bp, a) => (bp.removeBreakpoint(a[1]!) ? '' : 'ENOENT'), (a) => `Could not remove breakpoint ${a[1]}`);
const resumeCmd = debugCmd('resume', 1, 'tag', 'resumes the request tagged as tag', async (_io, bp, a) => (bp.resume(a[1]!) ? '' : 'ENOENT'), () => 'Could not resume request');
const waitBreakCmd = debugCmd(
  'wait_break',
  1,
  'tag',
  'waits for the suspension of a request',
  async (io, bp, a) => {
    // QEMU polls its event loop until a request is suspended with the tag; with no request in
    // flight that could reach it, it would wait for ever: we stop waiting then.
    while (!bp.isSuspended(a[1]!) && io.inFlight > 0) await Promise.race([bp.nextSuspension(), io.nextCompletion()]);
    return '';
  },
  () => '',
);

const helpCmd: Command = {
  name: 'help',
  alt: '?',
  argmin: 0,
  argmax: 1,
  global: true,
  args: '[command]',
  oneline: 'help for one or all commands',
  async run(io, argv) {
    const line = (name: string, ct: Command) => `${name} ${ct.args !== undefined ? ct.args + ' ' : ''}-- ${ct.oneline}\n`;
    if (argv.length < 2) {
      io.output.out(COMMANDS.map((ct) => line(ct.name, ct)).join('') + "\nUse 'help commandname' for extended help.\n");
      return 0;
    }
    const ct = findCommand(argv[1]!);
    if (!ct) {
      io.output.out(`command ${argv[1]} not found\n`);
      return EINVAL;
    }
    io.output.out(line(argv[1]!, ct) + (ct.help ?? ''));
    return 0;
  },
};

const quitCmd: Command = {
  name: 'quit',
  alt: 'q',
  argmin: -1,
  argmax: -1,
  global: true,
  oneline: 'exit the program',
  async run(io) {
    io.quit = true;
    return 0;
  },
};

/** Every command, sorted by name as qemu-io lists them. */
export const COMMANDS: Command[] = [
  readCmd,
  readvCmd,
  writeCmd,
  writevCmd,
  aioReadCmd,
  aioWriteCmd,
  aioFlushCmd,
  flushCmd,
  truncateCmd,
  lengthCmd,
  infoCmd,
  discardCmd,
  allocCmd,
  mapCmd,
  reopenCmd,
  breakCmd,
  removeBreakCmd,
  resumeCmd,
  waitBreakCmd,
  abortCmd,
  sleepCmd,
  sigraiseCmd,
  helpCmd,
  quitCmd,
  openCmd,
  closeCmd,
].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));

function findCommand(name: string): Command | undefined {
  return COMMANDS.find((c) => c.name === name || c.alt === name);
}
