/** A Spill in a temporary file (deleted when closed, and unlinked at once where possible). */
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Spill } from './spill.js';

/** A spill file in `dir` (default: the system's temporary folder, TMPDIR). */
export async function fileSpill(dir = tmpdir()): Promise<Spill> {
  const folder = await mkdtemp(join(dir, 'qcow-spill-'));
  const path = join(folder, 'clusters');
  const file = await open(path, 'w+');
  let size = 0;
  let closed = false;
  return {
    get size() {
      return size;
    },
    async append(data) {
      const at = size;
      size += data.length;
      await file.write(data, 0, data.length, at);
    },
    async read(offset, into) {
      for (let done = 0; done < into.length; ) {
        const { bytesRead } = await file.read(into, done, into.length - done, offset + done);
        if (bytesRead === 0) throw new Error(`spill file ended at ${offset + done}`);
        done += bytesRead;
      }
    },
    async close() {
      if (closed) return;
      closed = true;
      await file.close().catch(() => undefined);
      await rm(folder, { recursive: true, force: true });
    },
  };
}
