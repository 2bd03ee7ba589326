/**
 * A snapshot table the header places past the end of the file: QEMU opens the image and reads the
 * table as zeros (entries with no name and no L1 table), so qemu-io reads the disk, and qemu-img
 * snapshot -c refuses only when the table is full (65536 entries: "-27 (File too large)"); with
 * room, the new table lists the zero entries and the new snapshot, and the image checks clean,
 * after a warning that the old table's clusters could not be freed ("qcow2_free_clusters
 * failed"). The drop-in programs answer as QEMU's do (iotest 080).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** nb_snapshots (header offset 60) and snapshots_offset (64) set to what is given. */
async function placeTable(file: string, count: number, offset: number): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const b = Buffer.alloc(12);
    b.writeUInt32BE(count, 0);
    b.writeBigUInt64BE(BigInt(offset), 4);
    await fh.write(b, 0, 12, 60);
  } finally {
    await fh.close();
  }
}

test('a snapshot table past the end of the file reads as zeros, as in QEMU', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const count of [0x10000, 3]) {
    const results: unknown[] = [];
    for (const [img, io] of [
      ['qemu-img', 'qemu-io'],
      [COMPAT_IMG, COMPAT_IO],
    ] as const) {
      await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '64M'], dir);
      await placeTable(join(dir, 'a.qcow2'), count, 16 * 1024 * 1024);
      const read = await run(io, ['-c', 'read -P 0 0 512', 'a.qcow2'], { cwd: dir });
      const snap = await run(img, ['snapshot', '-c', 'test', 'a.qcow2'], { cwd: dir });
      // With room in the table, QEMU also warns that it could not free the old table's clusters
      // (there are none past the end of the file); so does the drop-in qemu-img.
      const stderr = snap.stderr;
      // (The table of 65536 entries is left unlisted and unchecked: 65536 lines, slowly.)
      const after = count === 3 ? [(await run('qemu-img', ['snapshot', '-l', 'a.qcow2'], { cwd: dir })).stdout.replace(/ 20\d\d-.*/g, ''), (await run('qemu-img', ['check', 'a.qcow2'], { cwd: dir })).stdout] : [];
      results.push([read.code, read.stdout.split('\n')[0], read.stderr, snap.code, snap.stdout, stderr, ...after]);
    }
    assert.deepEqual(results[1], results[0], `${count} entries`);
  }
});

test('freeing a snapshot table past the end of the file fails as QEMU says it does', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  // [table offset, what QEMU's refcount update runs into]: a refcount block with a count of 0
  // there (EINVAL); no refcount block there yet (EAGAIN: QEMU allocates one first, we do not, so
  // only the words are compared); past the refcount table's reach (EFBIG: QEMU then also fails to
  // flush its refcount cache, a second line we do not print).
  const cases: Array<[number, boolean]> = [
    [16 * 1024 * 1024, true],
    [4 * 1024 ** 3, false],
    [32 * 1024 ** 4, false],
  ];
  for (const [offset, sameImage] of cases) {
    const results: string[][] = [];
    for (const img of ['qemu-img', COMPAT_IMG]) {
      await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '64M'], dir);
      await qemuImg(['snapshot', '-c', 'one', 'a.qcow2'], dir);
      await placeTable(join(dir, 'a.qcow2'), 1, offset);
      for (const action of [['-c', 'two'], ['-d', 'two']]) {
        const snap = await run(img, ['snapshot', ...action, 'a.qcow2'], { cwd: dir });
        results.push([String(snap.code), snap.stderr.split('\n')[0]!]);
        if (!sameImage) break;
      }
      if (sameImage) results.push([(await run('qemu-img', ['check', 'a.qcow2'], { cwd: dir })).stdout]);
    }
    const half = results.length / 2;
    assert.deepEqual(results.slice(half), results.slice(0, half), `table at 0x${offset.toString(16)}`);
    assert.match(results[0]![1]!, /^qcow2_free_clusters failed: /);
  }
});
