/**
 * `qcow check [-f FMT] [-r leaks|all] [--output=json] FILE`: qemu-img check, through the format's
 * own check (ops/check.ts; qcow2 has one, raw and qcow v1 do not, as in QEMU). Findings go
 * to stderr one per line, the summary to stdout (or the JSON object); exit 0 clean, 2 corruptions,
 * 3 leaks only, 1 when the check cannot run, 63 for formats without checks, as qemu-img.
 */
import { QcowError, FileStore, permissionsFor, checkableFormat, checkExitCode, checkHuman, checkImage, checkJson, builtinFormats, type RepairMode } from '../../node.js';
import { checkOutputFormat, failureStyle, failureText, openForCli, openPolicy, printJson, writeOut } from '../common.js';

interface Flags {
  format?: string;
  repair?: string;
  output?: string;
  /** -U: a read-only check shares the image with a writer (a running VM), as qemu-img check -U. */
  forceShare?: boolean;
}

export async function run(file: string, flags: Flags): Promise<number> {
  const output = checkOutputFormat(flags.output);
  let repair: RepairMode | undefined;
  if (flags.repair !== undefined) {
    if (flags.repair !== 'leaks' && flags.repair !== 'all') throw new QcowError('QCOW_INVALID_ARGUMENT', `Unknown option for -r ('${flags.repair}'): expected 'leaks' or 'all'`);
    repair = flags.repair;
  }
  const formats = builtinFormats();
  // Before this run's own open: with -r it takes the write lock, which a second open would meet.
  if (openPolicy.refuseMalformedBitmaps) {
    const refusal = await openRefusal(file, flags.format);
    if (refusal) {
      process.stderr.write(failureText(refusal));
      return 1;
    }
  }
  const writable = repair !== undefined;
  const store = await FileStore.open(file, { readOnly: !writable, permissions: permissionsFor({ writable, format: 'qcow2', role: 'image', forceShare: flags.forceShare }) });
  try {
    if (flags.format === 'qcow2' && !(await isQcow2(store))) {
      // The QCOW magic with another version (a qcow v1 image) is named by its version, as qemu-img does.
      const version = await qcowVersion(store);
      const why = version !== undefined ? `Unsupported qcow2 version ${version}` : 'Image is not in qcow2 format';
      process.stderr.write(failureStyle.program === 'qcow' ? `qcow: ${file}: ${why}\n` : `${failureStyle.program}: Could not open '${file}': ${why}\n`);
      return 1;
    }
    if (!(await checkableFormat(store, { formats, format: flags.format }))) {
      process.stderr.write(`${failureStyle.program}: This image format does not support checks\n`);
      return 63;
    }
    let r;
    try {
      r = await checkImage(store, { formats, format: flags.format, repair });
    } catch (e) {
      // A check that cannot run exits 1, as qemu-img's does: 3 would say "leaks only".
      process.stderr.write(failureText(e));
      return 1;
    }
    for (const m of r.messages) process.stderr.write(m + '\n');
    if (r.failed !== undefined) {
      // As qemu-img: a check that stopped short shows no summary, only why it stopped.
      process.stderr.write(failureStyle.program === 'qcow' ? `qcow: ${file}: check failed: ${r.failed}\n` : `${failureStyle.program}: Check failed: ${r.failed}\n`);
      return 1;
    }
    if (output === 'json') printJson(checkJson(r, file, r.format));
    else writeOut(checkHuman(r));
    return checkExitCode(r);
  } finally {
    await store.close();
  }
}

/**
 * Under QEMU's open rules (openPolicy.refuseMalformedBitmaps), the failures that opening a qcow2
 * image gives before qemu-img check checks or repairs anything: a bitmap QEMU cannot load, an
 * external data file that is missing or that the header does not name. Other open failures are
 * the check's to report.
 */
async function openRefusal(file: string, format: string | undefined): Promise<QcowError | undefined> {
  // Only the magic is read here: the check's own open takes (or, with -U, shares) the locks.
  const store = await FileStore.open(file, { readOnly: true, noLock: true });
  try {
    if (!(await isQcow2(store))) return undefined;
  } finally {
    await store.close();
  }
  try {
    // The image alone, as QEMU opens it (its data file too), read-only: the check opens it again.
    const dev = await openForCli(file, { format }, { readOnly: true, inspectOnly: true, noBacking: true, forceShare: true });
    await dev.close();
    return undefined;
  } catch (e) {
    if (!(e instanceof QcowError)) return undefined;
    if (e.code === 'QCOW_UNSUPPORTED' && /^(?:Bitmap (?:'.*' doesn't satisfy the constraints|extra data is not supported)|'data-file' is required for this image)/.test(e.message)) return e;
    if (e.code === 'QCOW_NOT_FOUND' && /^Could not open data file /.test(e.message)) return e;
    return undefined;
  }
}

async function isQcow2(store: FileStore): Promise<boolean> {
  const v = await qcowVersion(store);
  return v === 2 || v === 3;
}

/** The version field of a file that starts with the QCOW magic, else undefined. */
async function qcowVersion(store: FileStore): Promise<number | undefined> {
  const head = new Uint8Array(8);
  await store.read(0, head);
  const dv = new DataView(head.buffer);
  return dv.getUint32(0) === 0x514649fb ? dv.getUint32(4) : undefined;
}
