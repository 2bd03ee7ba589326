/**
 * `qcow snapshot [-l] FILE`: list an image's internal snapshots in qemu-img's layout (listing is
 * also what qemu-img does when no action is given). Images without snapshots, and formats that
 * have none, print nothing.
 */
import { imageInfo, snapshotTable } from '../../ops/info.js';
import { openForCli } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  list?: boolean;
}

export async function run(file: string, flags: Flags): Promise<void> {
  // Listing reads only metadata: no backing files, no password needed for encrypted images.
  const dev = await openForCli(file, flags, { readOnly: true, inspectOnly: true, noBacking: true });
  try {
    const info = await imageInfo(dev);
    if (info.snapshots?.length) process.stdout.write(`Snapshot list:\n${snapshotTable(info.snapshots)}\n`);
  } finally {
    await dev.close();
  }
}
