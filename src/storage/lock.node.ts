/**
 * Advisory write locks between qcow processes, so two writers never open one image at once (two
 * writers each caching metadata corrupt an image in seconds). Node has no fcntl/flock, so the lock
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
