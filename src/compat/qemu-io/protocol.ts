/**
 * QEMU's host protocol drivers (`file`, `host_device`, `host_cdrom`) and the kind of file each
 * accepts. QEMU opens the file first (read-write unless read-only, so a directory fails there with
 * the errno) and only then looks at its type: a plain file for `file`, a character or block device
 * for the other two. qcow reads all of them the same way; this keeps QEMU's refusals.
 */
// statSync, not fs/promises: loading node:fs/promises (and readline, watchers) cost every qemu-io
// start ~200 page faults, for one metadata call the kernel answers at once.
import { statSync } from 'node:fs';
import { QcowError } from '../../node.js';

/** The protocol drivers qemu-io knows by name. */
export const HOST_PROTOCOLS = ['file', 'host_device', 'host_cdrom'] as const;
export type HostProtocol = (typeof HOST_PROTOCOLS)[number];

export function isHostProtocol(driver: string | undefined): driver is HostProtocol {
  return (HOST_PROTOCOLS as readonly string[]).includes(driver ?? '');
}

/** Refuses `name` as QEMU's `driver` would; a file that cannot be looked at is left to the open. */
export function checkHostProtocol(driver: HostProtocol, name: string, readOnly: boolean): void {
  let st;
  try {
    st = statSync(name);
  } catch {
    return;
  }
  if (st.isDirectory() && !readOnly) {
    const cause = Object.assign(new Error('Is a directory'), { code: 'EISDIR' });
    throw new QcowError('QCOW_INVALID_ARGUMENT', 'Is a directory', { file: name, cause });
  }
  if (driver === 'file') {
    if (!st.isFile()) throw new QcowError('QCOW_INVALID_ARGUMENT', `'file' driver requires '${name}' to be a regular file`, { file: name });
  } else if (!st.isCharacterDevice() && !st.isBlockDevice()) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `'${driver}' driver requires '${name}' to be either a character or block device`, { file: name });
  }
}
