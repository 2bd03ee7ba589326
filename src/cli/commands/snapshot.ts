/**
 * `qcow snapshot [-l | -c NAME | -a NAME | -d NAME] FILE`: list an image's internal snapshots in
 * qemu-img's layout (listing is also what qemu-img does when no action is given), or create,
 * apply (revert to) or delete one. Images without snapshots, and formats that have none, list
 * nothing; changing snapshots needs a format that has them (BlockDevice.createSnapshot and
 * friends: qcow2).
 */
import { QcowError, imageInfo, snapshotTable } from '../../node.js';
import { openForCli, writeOut } from '../common.js';

/**
 * Why a snapshot's counts could not change: a count past its width, the refcount table past its
 * limit, clusters no refcount block covers (formats/qcow2/alloc.ts, snapshot-write.ts).
 */
const REFCOUNT_REFUSAL = /^(?:Refcount overflow on cluster |refcount table would exceed 8 MiB|no refcount block covers cluster )/;

interface Flags {
  format?: string;
  passwordFile?: string;
  list?: boolean;
  create?: string;
  apply?: string;
  delete?: string;
}

export async function run(file: string, flags: Flags): Promise<void> {
  const actions = [flags.create, flags.apply, flags.delete].filter((a) => a !== undefined).length + (flags.list ? 1 : 0);
  if (actions > 1) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Cannot mix snapshot actions (-l, -c, -a, -d)');
  if (flags.create === undefined && flags.apply === undefined && flags.delete === undefined) return list(file, flags);
  // Snapshots concern this image only: its backing file is not needed, nor (for metadata) a password.
  // A step that fails while the action goes on is said on stderr, as qemu-img says it.
  const onWarning = (message: string) => process.stderr.write(`${message}\n`);
  const dev = await openForCli(file, flags, { readOnly: false, noBacking: true, inspectOnly: true, onWarning });
  let failed = false;
  try {
    const [verb, action, arg] =
      flags.create !== undefined ? ['create', dev.createSnapshot, flags.create] : flags.apply !== undefined ? ['apply', dev.applySnapshot, flags.apply] : ['delete', dev.deleteSnapshot, flags.delete!];
    if (!action) throw new QcowError('QCOW_UNSUPPORTED', `Could not ${verb} snapshot '${arg}': Operation not supported (format ${dev.format} has no snapshots)`);
    try {
      await action.call(dev, arg);
    } catch (e) {
      // Say which snapshot action failed, as qemu-img does (the compat table words the rest).
      const unusable = e instanceof QcowError && e.code === 'QCOW_CORRUPT' && /^snapshot '.*' L1 table/.test(e.message);
      if (e instanceof QcowError && (e.code === 'QCOW_NOT_FOUND' || unusable) && verb !== 'create') e.message = `Could not ${verb} snapshot '${arg}': ${e.message}`;
      if (e instanceof QcowError && verb === 'create' && REFCOUNT_REFUSAL.test(e.message)) e.message = `Could not create snapshot '${arg}': ${e.message}`;
      if (e instanceof QcowError && e.code === 'QCOW_IO' && verb === 'delete') e.message = `Could not delete snapshot '${arg}': ${e.message}`;
      failed = true;
      throw e;
    }
  } finally {
    // After a failed action the image may not take its write-back either; the action's error is the one to tell.
    if (failed) await dev.close().catch(() => undefined);
    else await dev.close();
  }
}

async function list(file: string, flags: Flags): Promise<void> {
  // Listing reads only metadata: no backing files, no password needed for encrypted images.
  const dev = await openForCli(file, flags, { readOnly: true, inspectOnly: true, noBacking: true });
  try {
    const info = await imageInfo(dev);
    if (info.snapshots?.length) writeOut(`Snapshot list:\n${snapshotTable(info.snapshots)}\n`);
  } finally {
    await dev.close();
  }
}
