/**
 * QEMU's image permissions, which its file locks publish (block/file-posix.c in QEMU 7.2), worked
 * out for each file we open, so that qcow and QEMU's programs (a VM, qemu-img, qemu-io, qemu-nbd)
 * keep out of each other's way. No I/O here: lock.node.ts turns the result into locks.
 *
 * Every user of a file has permissions (`perm`: what it does) and lets others do some things
 * (`shared`). Four permissions exist: consistent read, write, write-unchanged, resize. A user
 * publishes permission bit i as a shared lock on byte 100 + i of the file, and every bit it does
 * NOT share as a shared lock on byte 200 + i; then it tests whether anyone else holds byte 200 + i
 * for a permission it takes (someone refuses to share it) or byte 100 + i for one it refuses to
 * share (someone already uses it). The locks are Linux open-file-description locks.
 *
 * Which permissions QEMU takes, measured with its 7.2 tools (/proc/locks) and matching block.c:
 * - the program's own view of the image (qemu-img, qemu-io, qemu-nbd): consistent read, plus write
 *   when it opens for writing; it shares everything (-U / force-share shares everything too),
 *   except that qemu-nbd does not share resize (its export has a fixed size).
 * - a file holding an image format's metadata (qcow, qcow2, ...): also write and resize when
 *   writable; never shares write or resize: one writer, and no reader beside a writer, unless -U.
 * - a raw image: exactly the program's view (raw passes it through): readers and writers mix.
 * - a backing file: read only, and shares what its format lets it share.
 * - an external data file (qcow2 data_file): the image's view, without sharing resize, and with
 *   resize when it writes.
 */

export const PERM_CONSISTENT_READ = 0x1;
export const PERM_WRITE = 0x2;
export const PERM_WRITE_UNCHANGED = 0x4;
export const PERM_RESIZE = 0x8;
export const PERM_ALL = 0xf;

/** Number of permission bits, and the lock bytes they map to. */
export const PERM_COUNT = 4;
export const LOCK_PERM_BASE = 100;
export const LOCK_SHARED_BASE = 200;

/**
 * QEMU's permissions on one open file, which its locks publish: bit masks of consistent read
 * (0x1), write (0x2), write-unchanged (0x4) and resize (0x8), as QEMU's BLK_PERM_* numbers them.
 * A {@link ByteStore} with locks receives them in `setPermissions`.
 */
export interface Permissions {
  /** What this user does with the file (PERM_* bits). */
  perm: number;
  /** What it lets others do at the same time. */
  shared: number;
}

/** No locks at all: what a file is opened with until its format is known. */
export const NO_PERMISSIONS: Permissions = { perm: 0, shared: PERM_ALL };

/** How a program uses one file of an image, from which {@link permissionsFor} derives its locks. */
export interface FileUse {
  /** Opened for writing. */
  writable: boolean;
  /** The file's format: 'raw' passes the user's permissions through; any other keeps metadata. */
  format: string;
  /** The image a program opens, a backing file below it, or an image's external data file. */
  role: 'image' | 'backing' | 'data';
  /** qemu-img -U / force-share (read-only opens only, as in QEMU): share everything. */
  forceShare?: boolean;
  /**
   * The image is exported at a fixed size (an NBD server, as qemu-nbd): the program's view does
   * not let others resize the top image (a raw one too).
   */
  fixedSize?: boolean;
}

/** The permissions QEMU takes on a file used so (see the top). */
export function permissionsFor(use: FileUse): Permissions {
  // The program's view of the top image: read (and write), sharing everything. A backing file is
  // read through the image above it, which shares everything too; it is writable only while an
  // image is committed into it.
  let perm = PERM_CONSISTENT_READ | (use.writable ? PERM_WRITE : 0);
  let shared = PERM_ALL & ~(use.fixedSize && use.role !== 'backing' ? PERM_RESIZE : 0);
  if (use.role === 'data') {
    // The format keeps the data file's size in its metadata, and writing may grow it.
    shared &= ~PERM_RESIZE;
    if (perm & PERM_WRITE) perm |= PERM_RESIZE;
  } else if (use.format !== 'raw') {
    // The file holds metadata: the format may write it (and grow it) even when the guest does not,
    // and nobody else may change it under it.
    if (use.writable) perm |= PERM_WRITE | PERM_RESIZE;
    shared &= ~(PERM_WRITE | PERM_RESIZE);
  }
  if (use.forceShare && !use.writable) shared = PERM_ALL;
  return { perm, shared };
}

/** Permission names as QEMU prints them ("consistent read", "write", ...), joined with ", ". */
export function permissionNames(bits: number): string {
  const names = ['consistent read', 'write', 'write unchanged', 'resize'];
  return names.filter((_, i) => bits & (1 << i)).join(', ');
}
