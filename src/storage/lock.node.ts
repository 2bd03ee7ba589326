/**
 * Image locks. Two kinds:
 *
 * - QEMU's (with the host addon, src/host/native.node.ts): open-file-description byte-range locks
 *   on the image file itself, byte for byte as QEMU 7.2 takes them (see permissions.ts), so a VM,
 *   qemu-img, qemu-io or qemu-nbd and qcow see each other's use of an image. The kernel drops them
 *   when the file is closed or the process dies: nothing goes stale.
 * - The fallback (no addon: no compiler at install time, not Linux, QCOW_NO_NATIVE=1): our own
 *   write-lock file, below, which keeps qcow writers apart but is invisible to QEMU.
 *
 * The fallback lock file: Node has no fcntl/flock, so the lock
 * is a file named after the image's device and inode (the same image however it is spelled:
 * relative path, symlink, hard link) in a shared folder under the temp dir, holding the owner's
 * pid. A lock whose owner is gone (crash, SIGKILL) is stale and taken over. Readers take no lock:
 * they may share an image with each other and with a writer, as with qemu-img -U.
 *
 * "Gone" is more than "no process has that pid": stale lock files stay behind and pids are
 * reused, so after a while an unrelated process (a shell, a test runner) wears the pid of a lock
 * on a file nobody has open, and the image looked locked for good. A lock's owner holds the image
 * open for as long as it holds the lock, so where /proc shows the owner's open files (Linux), the
 * owner counts only while one of them is this very file (device and inode).
 */
import { chmodSync, closeSync, fstatSync, mkdirSync, openSync, readdirSync, readFileSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QcowError } from '../core/errors.js';
import { EXCLUSIVE, hostAddon, hostAddonStatus, SHARED, UNLOCK, type HostAddon } from '../host/native.node.js';
import { LOCK_PERM_BASE, LOCK_SHARED_BASE, PERM_COUNT, PERM_WRITE, permissionNames, type Permissions } from './permissions.js';

/** The locks one open file holds. */
export interface ImageLock {
  /**
   * Change to these permissions (taking new locks first, then checking nobody conflicts, then
   * dropping the ones no longer needed, as QEMU does). On a conflict the old locks stay and a
   * QcowError QCOW_LOCKED says which permission could not be had.
   */
  set(p: Permissions): void;
  /** Drop every lock. Call before closing the file (OFD locks go with the close anyway). */
  release(): void;
}

/** Which kind of lock qcow takes, for `qcow --version`. */
export function lockingKind(): string {
  return hostAddon() ? 'QEMU-compatible (OFD byte-range locks)' : `qcow lock files, not seen by QEMU (host addon ${hostAddonStatus()})`;
}

/** The locks of the file open as `fd` (named `name` in messages), starting with `p`. */
export function openImageLock(fd: number, name: string, p: Permissions): ImageLock {
  const addon = hostAddon();
  const lock: ImageLock = addon ? new OfdLock(addon, fd, name) : new LockFileLock(fd, name);
  lock.set(p);
  return lock;
}

/** Lock errors that mean "this file system has no such locks": fall back to the lock file. */
const UNSUPPORTED = new Set(['ENOLCK', 'EOPNOTSUPP', 'EINVAL', 'ENOSYS']);

class OfdLock implements ImageLock {
  /** Bits whose byte 100 + i, and 200 + i, we hold. */
  private lockedPerm = 0;
  private lockedUnshared = 0;
  private fallback: LockFileLock | undefined;

  constructor(
    private readonly addon: HostAddon,
    private readonly fd: number,
    private readonly name: string,
  ) {}

  set(p: Permissions): void {
    if (this.fallback) return this.fallback.set(p);
    const unshared = ~p.shared;
    const oldPerm = this.lockedPerm;
    const oldUnshared = this.lockedUnshared;
    try {
      // Publish what we take and what we refuse, keeping the old locks until the new ones hold.
      this.apply(oldPerm | p.perm, oldUnshared | unshared, false);
      this.check(p.perm, p.shared);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== undefined && UNSUPPORTED.has(code)) {
        // A file system without these locks (some FUSE and network ones): our own lock file.
        this.apply(0, 0, true);
        this.fallback = new LockFileLock(this.fd, this.name);
        return this.fallback.set(p);
      }
      this.apply(oldPerm, oldUnshared, true);
      throw e instanceof QcowError ? e : new QcowError('QCOW_IO', `Failed to lock the image: ${(e as Error).message}`, { file: this.name, cause: e });
    }
    this.apply(p.perm, unshared, true);
  }

  release(): void {
    if (this.fallback) return this.fallback.release();
    try {
      this.apply(0, 0, true);
    } catch {
      // Closing the file drops them anyway.
    }
  }

  /** Hold bytes for `perm` and `unshared`; with `unlock`, also let go of the others. */
  private apply(perm: number, unshared: number, unlock: boolean): void {
    for (const [base, want, field] of [
      [LOCK_PERM_BASE, perm, 'lockedPerm'],
      [LOCK_SHARED_BASE, unshared, 'lockedUnshared'],
    ] as const) {
      for (let i = 0; i < PERM_COUNT; i++) {
        const bit = 1 << i;
        const held = (this[field] & bit) !== 0;
        if (want & bit && !held) {
          if (!this.addon.ofdLock(this.fd, base + i, 1, SHARED)) {
            // Only an exclusive lock conflicts with a shared one; QEMU takes none, so this is
            // another program: report it as QEMU does.
            throw new QcowError('QCOW_LOCKED', `Failed to lock byte ${base + i}`, { file: this.name });
          }
          this[field] |= bit;
        } else if (unlock && held && !(want & bit)) {
          this.addon.ofdLock(this.fd, base + i, 1, UNLOCK);
          this[field] &= ~bit;
        }
      }
    }
  }

  /** Does another user refuse to share what we take, or already use what we refuse to share? */
  private check(perm: number, shared: number): void {
    for (let i = 0; i < PERM_COUNT; i++) {
      const bit = 1 << i;
      if (perm & bit && this.addon.ofdTest(this.fd, LOCK_SHARED_BASE + i, 1, EXCLUSIVE) !== UNLOCK) {
        throw lockedError(`Failed to get "${permissionNames(bit)}" lock`, this.name);
      }
    }
    for (let i = 0; i < PERM_COUNT; i++) {
      const bit = 1 << i;
      if (!(shared & bit) && this.addon.ofdTest(this.fd, LOCK_PERM_BASE + i, 1, EXCLUSIVE) !== UNLOCK) {
        throw lockedError(`Failed to get shared "${permissionNames(bit)}" lock`, this.name);
      }
    }
  }
}

function lockedError(what: string, name: string): QcowError {
  return new QcowError('QCOW_LOCKED', `${what}: is another process using the image?`, { file: name });
}

/** The fallback: a lock file while the permissions include writing (see the top). */
class LockFileLock implements ImageLock {
  private lock: WriteLock | undefined;

  constructor(
    private readonly fd: number,
    private readonly name: string,
  ) {}

  set(p: Permissions): void {
    if (p.perm & PERM_WRITE) this.lock ??= acquireWriteLock(this.fd, this.name);
    else this.release();
  }

  release(): void {
    this.lock?.release();
    this.lock = undefined;
  }
}

export interface WriteLock {
  release(): void;
}

const lockDir = () => join(tmpdir(), 'qcow-locks');

/** Is `pid` a live process that has the file (dev, ino) open? Where that cannot be seen: is it alive. */
function holdsFile(pid: number, dev: number, ino: number): boolean {
  if (!alive(pid)) return false;
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    // No /proc (macOS), or another user's process: its open files are not ours to see.
    return true;
  }
  for (const fd of fds) {
    try {
      const st = statSync(`/proc/${pid}/fd/${fd}`, { throwIfNoEntry: false });
      if (st && st.dev === dev && st.ino === ino) return true;
    } catch {
      // Closed meanwhile, or not ours to stat: not the image.
    }
  }
  return false;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Take the write lock of the image open as `fd`. Synchronous: a handful of metadata calls in a
 * local folder, cheaper done at once than as thread-pool round trips (see file.node.ts).
 */
export function acquireWriteLock(fd: number, name: string): WriteLock {
  const st = fstatSync(fd);
  const dir = lockDir();
  try {
    // The folder is shared by every user's qcow processes, like /tmp itself: the umask must not
    // narrow it (with 022 it came out 1755, and other users' writers then ran unlocked).
    if (mkdirSync(dir, { recursive: true, mode: 0o1777 }) !== undefined) chmodSync(dir, 0o1777);
  } catch {
    // Reported below, when the lock file cannot be made either.
  }
  const path = join(dir, `${st.dev}-${st.ino}.lock`);
  for (let attempt = 0; attempt < 3; attempt++) {
    let lf: number;
    try {
      lf = openSync(path, 'wx', 0o644);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'EEXIST') {
        // No shared lock folder we can write (read-only temp dir): run unlocked rather than refuse.
        return { release: () => undefined };
      }
      const owner = Number.parseInt(readOr(path, ''), 10);
      if (Number.isInteger(owner) && owner > 0 && holdsFile(owner, st.dev, st.ino)) {
        throw new QcowError('QCOW_LOCKED', `Failed to get "write" lock: the image is open for writing by process ${owner}`, { file: name });
      }
      // Stale (owner gone) or half-written: remove it and try again.
      removeQuietly(path);
      continue;
    }
    try {
      writeSync(lf, String(process.pid));
      closeSync(lf);
    } catch {
      // A full temp dir: no lock rather than no image (as when the folder cannot be written).
      closeQuietly(lf);
      removeQuietly(path);
      return { release: () => undefined };
    }
    let released = false;
    return {
      release: () => {
        if (released) return;
        released = true;
        removeQuietly(path);
      },
    };
  }
  throw new QcowError('QCOW_LOCKED', 'Failed to get "write" lock: could not take the lock file', { file: name });
}

function readOr(path: string, fallback: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return fallback;
  }
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // Nothing more to do with it.
  }
}

function removeQuietly(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // Already gone.
  }
}
