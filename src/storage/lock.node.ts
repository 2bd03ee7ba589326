/**
 * Advisory write locks between qcow processes, so two writers never open one image at once (two
 * writers each caching metadata corrupt an image in seconds). Node has no fcntl/flock, so the lock
 * is a file named after the image's device and inode (the same image however it is spelled:
 * relative path, symlink, hard link) in a shared folder under the temp dir, holding the owner's
 * pid. A lock whose owner is gone (crash, SIGKILL) is stale and taken over. Readers take no lock:
 * they may share an image with each other and with a writer, as with qemu-img -U.
 */
import { mkdir, open, readFile, unlink, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QcowError } from '../core/errors.js';

export interface WriteLock {
  release(): Promise<void>;
}

const lockDir = () => join(tmpdir(), 'qcow-locks');

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export async function acquireWriteLock(fh: FileHandle, name: string): Promise<WriteLock> {
  const st = await fh.stat();
  const dir = lockDir();
  await mkdir(dir, { recursive: true, mode: 0o1777 }).catch(() => undefined);
  const path = join(dir, `${st.dev}-${st.ino}.lock`);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const lf = await open(path, 'wx', 0o644);
      await lf.writeFile(String(process.pid));
      await lf.close();
      let released = false;
      return {
        release: async () => {
          if (released) return;
          released = true;
          await unlink(path).catch(() => undefined);
        },
      };
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'EEXIST') {
        // No shared lock folder we can write (read-only temp dir): run unlocked rather than refuse.
        return { release: async () => undefined };
      }
      const owner = Number.parseInt(await readFile(path, 'utf8').catch(() => ''), 10);
      if (Number.isInteger(owner) && owner > 0 && alive(owner)) {
        throw new QcowError('QCOW_LOCKED', `Failed to get "write" lock: the image is open for writing by process ${owner}`, { file: name });
      }
      // Stale (owner gone) or half-written: remove it and try again.
      await unlink(path).catch(() => undefined);
    }
  }
  throw new QcowError('QCOW_LOCKED', 'Failed to get "write" lock: could not take the lock file', { file: name });
}
