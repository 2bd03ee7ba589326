import { realpathSync, statSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { FileStore, QcowError, chainOf, commit, permissionsFor } from '../../node.js';
import { openForCli, withProgress, writeOut } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  base?: string;
  drop?: boolean;
  progress?: boolean;
  quiet?: boolean;
}

/**
 * `qcow commit [-b BASE] [-d] [-p] FILE`. The chain is opened once read-only to find the base
 * (by the name an image records for it, or by path), then again with the top image and the base
 * writable. As qemu-img, -b implies -d: the images between would no longer make sense.
 */
export async function run(file: string, flags: Flags): Promise<void> {
  await writerLocksFree(file);
  const depth = await baseDepth(file, flags);
  const drop = !!flags.drop || flags.base !== undefined;
  const top = await openForCli(file, flags, { readOnly: drop, writableBacking: (_name, d) => d === depth });
  try {
    const base = chainOf(top)[depth]!;
    await withProgress(flags, (signal, onProgress) => commit(top, { base, drop, signal, onProgress }));
  } finally {
    await top.close();
  }
  if (!flags.quiet) writeOut('Image committed.\n');
}

/**
 * QEMU's commit opens the top image for writing from the start, so another user of it (a running
 * VM) makes it fail for the "write" lock it cannot take, before anything is read. Our first open is
 * read-only (to find the base), whose lock test would name the shared "write" lock instead: the
 * locks a writer takes are tried first, on a plain file (other names open as they say, later).
 */
async function writerLocksFree(file: string): Promise<void> {
  if (!statSync(file, { throwIfNoEntry: false })?.isFile()) return;
  const store = await FileStore.open(file, { readOnly: true, permissions: permissionsFor({ writable: true, format: 'qcow2', role: 'image' }) });
  await store.close();
}

async function baseDepth(file: string, flags: Flags): Promise<number> {
  const top = await openForCli(file, flags, { readOnly: true });
  try {
    const chain = chainOf(top);
    if (chain.length < 2) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Image does not have a backing file', { file });
    if (flags.base === undefined) return 1;
    for (let d = 1; d < chain.length; d++) {
      const named = (await chain[d - 1]!.describe()).backingFilename;
      if (named !== undefined && namesBacking(flags.base, chain[d - 1]!.filename, named, chain[d]!.filename)) return d;
    }
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Did not find '${flags.base}' in the backing chain of '${file}'`);
  } finally {
    await top.close();
  }
}

/** QEMU's path_has_protocol: a colon before any slash (`json:{...}`, `nbd:...`, `blkdebug:...`). */
function hasProtocol(name: string): boolean {
  const m = /[:/]/.exec(name);
  return m !== null && m[0] === ':';
}

/** `name` relative to the folder of `image` (QEMU's path_combine), its real path; undefined when it does not exist. */
function realPathBeside(image: string, name: string): string | undefined {
  try {
    return realpathSync(isAbsolute(name) || hasProtocol(image) ? name : join(dirname(image), name));
  } catch {
    return undefined;
  }
}

/**
 * Whether the -b name `given` names the backing file of `image` (which records it as `named` and
 * opened it as `opened`), as qemu-img's lookup decides: names with a protocol are compared as
 * they are; a path is taken relative to the image's folder (never the working directory, so
 * `subdir/mid` does not name `subdir/top`'s backing file `mid`) and compared by real path.
 */
function namesBacking(given: string, image: string, named: string, opened: string): boolean {
  if (hasProtocol(given) || hasProtocol(named)) return given === named || given === opened;
  const want = realPathBeside(image, given);
  return want !== undefined && want === realPathBeside(image, named);
}
