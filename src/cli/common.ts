/** What every CLI command shares: opening images the way the flags say, passwords, -o lists, errors. */
import { readFileSync, unlinkSync, writeSync } from 'node:fs';
import { QcowError, stringifyExact, type BlockDevice, type CorruptionEvent, type NodeOpenOptions } from '../node.js';
// Type only: node-open.js pulls in every format; it is loaded when an image is opened
// (openForCli), so `--help`, `--version` and argument errors start fast.
import { splitOptionItems } from './option-list.js';

export interface ImageFlags {
  format?: string;
  passwordFile?: string;
  /** -U / --force-share: read-only opens share the image with writers, as qemu-img -U (see chain/open.ts). */
  forceShare?: boolean;
  /** --confine: refuse backing and data files outside the folder of the image naming them. */
  confine?: boolean;
  /** false for --no-probe-backing: backing files of unrecorded format are opened as raw. */
  probeBacking?: boolean;
}

export async function readPasswordFile(path: string | undefined): Promise<string | undefined> {
  if (path === undefined) return undefined;
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new QcowError('QCOW_NOT_FOUND', `cannot read password file: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory' : (e as Error).message}`, {
      file: path,
    });
  }
  // A password file conventionally ends with one newline; it is not part of the password.
  return text.replace(/\r?\n$/, '');
}

/**
 * The safety rules asked for on the command line (`--confine`, `--no-probe-backing`), set by
 * main.ts for the command that runs, so every image a command opens follows them; and QEMU's
 * stricter open rules, which a persona (compat/qemu-img) sets for its run.
 */
export const openPolicy: {
  confine?: boolean;
  probeBacking?: boolean;
  refuseMalformedBitmaps?: boolean;
  /**
   * A persona's own kinds of image name (compat/qemu-img: QEMU's `json:{...}` names): returns
   * how to open `file` when the name is one of them, else undefined for the usual open.
   */
  openName?: (file: string) => ((options: NodeOpenOptions) => Promise<BlockDevice>) | undefined;
  /** A persona's secrets by id (compat/qemu-img: `--object secret`), which key-secret options name. */
  secrets?: ReadonlyMap<string, string>;
  /** External data files the user named for images (by the image's name as given): see OpenImageOptions.dataFile. */
  dataFiles?: Map<string, string>;
  /** resize opens an encrypted image with its key, as QEMU does (which refuses it without one). */
  keyToResize?: boolean;
  /** Told what an open repaired (OpenOptions.onRepair): a persona that prints it as QEMU does. */
  onRepair?: NodeOpenOptions['onRepair'];
  /** Told the corruption events of an image in use (OpenOptions.onCorruption): a persona prints them as QEMU does. */
  onCorruption?: NodeOpenOptions['onCorruption'];
  /** Told each image opened writable whose format was probed as raw (OpenImageOptions.onProbedRaw): a persona warns as QEMU does. */
  onProbedRaw?: NodeOpenOptions['onProbedRaw'];
} = {};

/** The password of the secret `id` (openPolicy.secrets); QEMU's error when there is none. */
export function secretNamed(id: string): string {
  const password = openPolicy.secrets?.get(id);
  if (password === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', `No secret with id '${id}'`);
  return password;
}

/** The password that create options name through a key secret (`encrypt.key-secret`, luks `key-secret`), if they do. */
export function createOptionsSecret(options: Record<string, string>): string | undefined {
  const id = options['encrypt.key-secret'] ?? options['key-secret'];
  return id === undefined ? undefined : secretNamed(id);
}

export async function openForCli(file: string, flags: ImageFlags, extra: NodeOpenOptions = {}): Promise<BlockDevice> {
  const confine = flags.confine ?? openPolicy.confine ?? false;
  const probeBacking = flags.probeBacking ?? openPolicy.probeBacking ?? true;
  const { openImage } = await import('./open-images.js');
  const special = openPolicy.openName?.(file) ?? (await nbdOpener(file));
  const open = special ? (_name: string, o: NodeOpenOptions) => special(o) : openImage;
  const { openName, refuseMalformedBitmaps } = openPolicy;
  // Backing files named in the persona's own way (QEMU's json:{...}) open as the persona opens
  // them, and so do the backing files of those: a json:{...} name's image has its own chain.
  const openBackingName: NodeOpenOptions['openBackingName'] =
    openName && ((name, o) => openName(name)?.({ ...o, refuseMalformedBitmaps, forceShare: flags.forceShare, openBackingName }));
  return open(file, {
    openBackingName,
    format: flags.format,
    password: await readPasswordFile(flags.passwordFile),
    confineToFolder: confine,
    rawUnnamedBackingFormats: !probeBacking,
    forceShare: flags.forceShare,
    refuseMalformedBitmaps: openPolicy.refuseMalformedBitmaps,
    onRepair: openPolicy.onRepair,
    // Read-only, every event fails the request that met it, whose error says it all.
    onCorruption: openPolicy.onCorruption ?? (extra.readOnly ? undefined : tellCorruption),
    dataFile: openPolicy.dataFiles?.get(file),
    onProbedRaw: openPolicy.onProbedRaw ?? tellProbedRaw,
    ...extra,
  });
}

/**
 * Our own CLI's word on a corruption event that does not fail the command (on an image open
 * read-write, QEMU's non-fatal events: a cluster that cannot be freed is leaked): a warning line.
 * Fatal ones fail the command, and its error says why.
 */
function tellCorruption(e: CorruptionEvent): void {
  if (!e.fatal) process.stderr.write(`${failureStyle.program}: warning: the image is corrupt: ${e.message} (check -r all repairs it)\n`);
}

/** Our own CLI's word when an image to be written was probed as raw: what is restricted, and how to lift it. */
function tellProbedRaw(name: string): void {
  process.stderr.write(
    `${failureStyle.program}: warning: the format of '${name}' was not given and probing guessed raw: writes that would put another format's header into its first 512 bytes are refused (give -f raw to allow them)\n`,
  );
}

/**
 * An NBD export named as QEMU's programs name one (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`,
 * `nbd:unix:PATH`, `nbd:HOST:PORT`): a raw image over the connection, its allocation the server's
 * block status. Undefined for any other name (the NBD client is loaded only for these).
 */
async function nbdOpener(file: string): Promise<((options: NodeOpenOptions) => Promise<BlockDevice>) | undefined> {
  if (!file.startsWith('nbd')) return undefined;
  const { nbdTargetOf } = await import('../compat/nbd-store.js');
  if (!nbdTargetOf(file)) return undefined;
  const { openNbdImage } = await import('../compat/qemu-img/nbd-device.js');
  return (options) => openNbdImage(file, {}, options);
}

/** qemu-img's -o syntax: key=value pairs separated by commas; ",," is a literal comma. */
export function parseOptionList(list: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const text of list ?? []) {
    const parts = splitOptionItems(text);
    for (const p of parts) {
      if (p === '') continue;
      const eq = p.indexOf('=');
      if (eq < 0) {
        if (p === 'help' || p === '?') out.help = 'on';
        else out[p] = 'on';
      } else out[p.slice(0, eq)] = p.slice(eq + 1);
    }
  }
  return out;
}

export const collect = (value: string, previous: string[] = []): string[] => [...previous, value];

/** Exit statuses: 1 for failures in general, as qemu-img; a few kinds get their own so scripts can tell. */
export function exitCodeFor(e: unknown): number {
  if (e instanceof QcowError) {
    switch (e.code) {
      case 'QCOW_CORRUPT':
        return 3;
      case 'QCOW_BAD_PASSWORD':
      case 'QCOW_NEED_PASSWORD':
        return 4;
      default:
        return 1;
    }
  }
  return 1;
}

/** One line for a person: `qcow: <file>: <message>`. Unexpected errors keep their message, never a stack. */
export function errorLine(e: unknown): string {
  if (e instanceof QcowError) return e.file ? `qcow: ${e.file}: ${e.message}` : `qcow: ${e.message}`;
  const err = e as NodeJS.ErrnoException;
  if (err && typeof err.message === 'string') return `qcow: ${err.message}`;
  return `qcow: ${String(e)}`;
}

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * Write to stdout: straight to file descriptor 1. process.stdout would be made on first use, and
 * making it loads node:stream and friends (~2 ms of a ~35 ms `info`). On Linux Node writes stdout
 * synchronously whatever it is (file, pipe, terminal), so this keeps the same order and blocking.
 * A descriptor left non-blocking by whoever started us is waited on; a closed pipe
 * (`qcow map x | head`) ends the output and the program quietly, as qemu-img's SIGPIPE does.
 */
export function writeOut(text: string): void {
  const bytes = Buffer.from(text, 'utf8');
  for (let done = 0; done < bytes.length; ) {
    try {
      done += writeSync(1, bytes, done, bytes.length - done);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EPIPE') process.exit(0);
      if (code !== 'EAGAIN') throw e;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
    }
  }
}

/** How JSON output is laid out: ours by default; a persona (compat/qemu-img) may set QEMU's. */
export const jsonStyle: { stringify?: (value: unknown) => string } = {};

/**
 * Whose words a command's own failure lines use: qcow's by default; a persona (compat/qemu-img)
 * sets its program name, and its error text for failures, for the run (set by runQcow).
 */
export const failureStyle: { program: string; errorText?: (e: unknown) => string } = { program: 'qcow' };

/** A command's failure line for `e`, in the run's style. */
export function failureText(e: unknown): string {
  return failureStyle.errorText ? failureStyle.errorText(e) : errorLine(e) + '\n';
}

export function printJson(value: unknown): void {
  writeOut((jsonStyle.stringify ?? ((v: unknown) => stringifyExact(v, 4)))(value) + '\n');
}

export function checkOutputFormat(output: string | undefined): 'json' | 'human' {
  const o = output ?? 'human';
  if (o !== 'json' && o !== 'human') throw new QcowError('QCOW_INVALID_ARGUMENT', `--output must be human or json, not '${o}'`);
  return o;
}

/**
 * How -p is drawn. qcow's own: on stderr, only where it is a terminal (see progressBar).
 * `qemu` (compat/qemu-img): as qemu-img draws it, on standard output whatever that is, from
 * "(0.00/100%)" at the start, redrawn whenever it moves by more than one point, and ended by a
 * last "(100.00/100%)" and a new line (scripts and QEMU's iotests read these lines).
 */
export const progressStyle: { qemu: boolean } = { qemu: false };

/** A progress bar: call it with (done, total); `active` says whether it draws at all. */
export type ProgressBar = ((done: number, total: number) => void) & { readonly active: boolean; finish(): void; clear(): void };

/**
 * Progress for -p, on stderr in qemu-img's form ("    (12.34/100%)" redrawn with a carriage
 * return). It is drawn when asked for (-p) and stderr is a terminal; when stderr is a file or a
 * pipe it stays hidden unless QCOW_PROGRESS=always asks for it there too. Redrawn only when the
 * value moves by 0.01% and at most every 50 ms, so huge copies do not flood the terminal.
 * In the `qemu` style (progressStyle) it is qemu-img's instead.
 */
export function progressBar(asked: boolean, stream?: { isTTY?: boolean; write(s: string): unknown }): ProgressBar {
  if (progressStyle.qemu) return qemuProgressBar(asked, stream);
  // process.stderr only when asked: Node makes the stream on first use, loading node:stream.
  const out = asked ? (stream ?? process.stderr) : { write: () => undefined };
  const enabled = asked && (!!out.isTTY || process.env.QCOW_PROGRESS === 'always');
  let last = -1;
  let lastAt = 0;
  let drawn = false;
  const draw = (done: number, total: number) => {
    if (!enabled) return;
    const pct = total > 0 ? Math.floor((done / total) * 10000) / 100 : 100;
    const t = Date.now();
    if (pct === last || (t - lastAt < 50 && pct < 100)) return;
    last = pct;
    lastAt = t;
    drawn = true;
    out.write(`    (${pct.toFixed(2)}/100%)\r`);
  };
  return Object.assign(draw, {
    active: enabled,
    /** The operation completed: show 100% and end the line. */
    finish() {
      if (enabled) out.write(`    (100.00/100%)\n`);
    },
    /** The operation stopped early: end the line so the error message starts on its own. */
    clear() {
      if (enabled && drawn) out.write('\n');
    },
  });
}

/**
 * `x` with two decimals as C's printf("%.2f") writes it: the exact binary value rounded, a tie
 * (3.125) to the even digit, where toFixed takes the larger one ("3.13" for printf's "3.12").
 */
export function printfFixed2(x: number): string {
  const scaled = x * 100; // exact for a float's 24-bit mantissa
  const low = Math.floor(scaled);
  if (scaled - low !== 0.5) return x.toFixed(2);
  return ((low % 2 === 0 ? low : low + 1) / 100).toFixed(2);
}

/** qemu-img's progress (its qemu-progress.c behaviour, see progressStyle), on standard output. */
function qemuProgressBar(asked: boolean, stream?: { write(s: string): unknown }): ProgressBar {
  const out = asked ? (stream ?? process.stdout) : { write: () => undefined };
  const show = (pct: number) => out.write(`    (${printfFixed2(pct)}/100%)\r`);
  let last = 0;
  if (asked) show(0);
  const draw = (done: number, total: number) => {
    if (!asked) return;
    // QEMU keeps the percentage in a C float: the same rounding, so the same lines are drawn.
    const pct = Math.fround(Math.min(100, total > 0 ? (100 * done) / total : 100));
    if (pct > last + 1 || pct < last - 1 || pct === 0 || pct === 100) {
      last = pct;
      show(pct);
    }
  };
  return Object.assign(draw, {
    active: asked,
    finish() {
      if (!asked) return;
      show(100);
      out.write('\n');
    },
    clear() {
      if (asked) out.write('\n');
    },
  });
}

/**
 * What every long command wraps its work in: Ctrl-C or SIGTERM as `signal`, and the progress bar
 * `-p` asks for as `progress`, finished when the work succeeds and its line ended when it fails
 * (so the error starts on a line of its own). The work's own clean-up stays in `work`.
 */
export async function withProgress<T>(
  flags: { progress?: boolean; quiet?: boolean },
  work: (signal: AbortSignal, progress: ProgressBar) => Promise<T>,
): Promise<T> {
  const interrupt = interruptSignal();
  const bar = progressBar(!!flags.progress && !flags.quiet);
  try {
    const result = await work(interrupt.signal, bar);
    bar.finish();
    return result;
  } catch (e) {
    bar.clear();
    throw e;
  } finally {
    interrupt.dispose();
  }
}

/** Remove a file this command created, for a command that failed; already gone is fine. */
export function removeCreated(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // Already gone: nothing to clean up.
  }
}

/**
 * An AbortSignal that fires on Ctrl-C (SIGINT) or SIGTERM while a long operation runs, so it can
 * stop between steps and the command can still close (and so flush) its images. A second Ctrl-C
 * is left to Node's default: exit at once.
 */
export function interruptSignal(): { signal: AbortSignal; dispose(): void } {
  const ac = new AbortController();
  const onSignal = (name: NodeJS.Signals) => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    ac.abort(new Error(`interrupted (${name})`));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    signal: ac.signal,
    dispose() {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}
