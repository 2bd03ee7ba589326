/** What every CLI command shares: opening images the way the flags say, passwords, -o lists, errors. */
import { readFile } from 'node:fs/promises';
import type { BlockDevice } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';
import { openImage, type NodeOpenOptions } from '../node.js';

export interface ImageFlags {
  format?: string;
  passwordFile?: string;
  /** -U / --force-share is accepted for qemu-img compatibility; opening read-only never locks out others. */
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
    text = await readFile(path, 'utf8');
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
 * main.ts for the command that runs, so every image a command opens follows them.
 */
export const openPolicy: { confine?: boolean; probeBacking?: boolean } = {};

export async function openForCli(file: string, flags: ImageFlags, extra: NodeOpenOptions = {}): Promise<BlockDevice> {
  const confine = flags.confine ?? openPolicy.confine ?? false;
  const probeBacking = flags.probeBacking ?? openPolicy.probeBacking ?? true;
  return openImage(file, {
    format: flags.format,
    password: await readPasswordFile(flags.passwordFile),
    confineToFolder: confine,
    rawUnnamedBackingFormats: !probeBacking,
    ...extra,
  });
}

/** qemu-img's -o syntax: key=value pairs separated by commas; ",," is a literal comma. */
export function parseOptionList(list: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const text of list ?? []) {
    const parts: string[] = [];
    let cur = '';
    for (let i = 0; i < text.length; i++) {
      if (text[i] === ',' && text[i + 1] === ',') {
        cur += ',';
        i++;
      } else if (text[i] === ',') {
        parts.push(cur);
        cur = '';
      } else cur += text[i];
    }
    parts.push(cur);
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

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 4) + '\n');
}

export function checkOutputFormat(output: string | undefined): 'json' | 'human' {
  const o = output ?? 'human';
  if (o !== 'json' && o !== 'human') throw new QcowError('QCOW_INVALID_ARGUMENT', `--output must be human or json, not '${o}'`);
  return o;
}

/** A progress bar on stderr, drawn only on a terminal unless forced. */
export function progressBar(enabled: boolean): ((done: number, total: number) => void) & { finish(): void } {
  let last = -1;
  const draw = (done: number, total: number) => {
    if (!enabled) return;
    const pct = total > 0 ? Math.floor((done / total) * 10000) / 100 : 100;
    if (pct === last) return;
    last = pct;
    process.stderr.write(`    (${pct.toFixed(2)}/100%)\r`);
  };
  return Object.assign(draw, {
    finish() {
      if (enabled) process.stderr.write(`    (100.00/100%)\n`);
    },
  });
}
