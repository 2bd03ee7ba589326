/**
 * Backups and bitmap runs on a 4 TiB disk, where nothing may grow with the disk: a fully dirty
 * bitmap (every granule of 4 TiB) is backed up incrementally with memory bounded and without
 * reading 4 TiB of zeros, and a bitmap whose bits alternate (two million dirty runs) streams
 * through changedRuns without the runs ever being held together. Each measurement runs in a
 * child process, whose peak RSS is the assertion; the result is checked with the real qemu-img.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { openImage } from '#src/node.js';
import type { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { decodeDirectory } from '#src/formats/qcow2/bitmaps/directory.js';
import { dataClusters, decodeTable } from '#src/formats/qcow2/bitmaps/table.js';
import { changedExtents } from '#src/ops/changed-extents.js';
import { needs, qemuImg, qemuIo, run, runOk, scratch } from '../support/qemu.js';

const TIB4 = 4 * 2 ** 40;
const GRANULARITY = 2 ** 20;
const NODE_ENTRY = new URL('../../dist/node.js', import.meta.url).href;
/** Peak RSS allowed to a child: Node itself takes 40-60 MiB; a list of the runs would take more. */
const MAX_RSS_MIB = 160;

/** Run `body` (an ES module body, with the library imported as `q`) in a child; its JSON result and peak RSS. */
async function child(body: string, args: string[]): Promise<{ result: unknown; rssMiB: number }> {
  const code = `import * as q from ${JSON.stringify(NODE_ENTRY)};
const args = process.argv.slice(1);
const result = await (async () => { ${body} })();
process.stdout.write(JSON.stringify({ result, rssMiB: process.resourceUsage().maxRSS / 1024 }));`;
  const r = await runOk(process.execPath, ['--input-type=module', '-e', code, ...args], { timeoutMs: 600_000 });
  return JSON.parse(r.stdout) as { result: unknown; rssMiB: number };
}

/** A 4 TiB qcow2 whose bitmap 'all' (1 MiB granularity) is dirty over the whole disk. */
async function fullyDirty(dir: string): Promise<string> {
  const f = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', f, String(TIB4)]);
  await qemuImg(['bitmap', '--add', '-g', String(GRANULARITY), f, 'all']);
  // A discard of the whole (empty) disk marks every granule, as in QEMU; then some data.
  const dev = await openImage(f);
  await dev.discard(0, dev.size);
  await dev.close();
  await qemuIo(['-c', 'write -P 7 1G 1M', '-c', 'write -P 9 3T 64k', f]);
  return f;
}

test('an incremental backup of a 4 TiB disk whose bitmap is dirty everywhere: bounded memory, zeros not read, the chain reads as the disk', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const disk = await fullyDirty(dir);
  // The previous backup holds data where the disk now reads zeros: the overlay must hide it.
  const prev = join(dir, 'prev.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', prev, String(TIB4)]);
  await qemuIo(['-c', 'write -P 5 2T 1M', '-c', 'write -P 5 1G 2M', prev]);
  const inc = join(dir, 'inc.qcow2');
  const { result, rssMiB } = await child(
    `const [disk, prev, inc] = args;
     const dev = await q.openImage(disk);
     try {
       return await q.backup(dev, {
         bitmap: 'all',
         previous: { file: prev, format: 'qcow2' },
         // 2 MiB clusters: zero flags over 4 TiB take 16 MiB of L2 tables instead of 512 MiB.
         createTarget: async (size, backing) => {
           await q.createImage(inc, { format: 'qcow2', size, backingFile: backing.file, backingFormat: backing.format, options: { cluster_size: '2M' } });
           return q.openImage(inc, { format: 'qcow2' });
         },
       });
     } finally {
       await dev.close();
     }`,
    [disk, prev, inc],
  );
  assert.deepEqual(result, { kind: 'incremental', bytes: TIB4 });
  assert.ok(rssMiB < MAX_RSS_MIB, `peak RSS ${rssMiB.toFixed(1)} MiB`);
  // The chain inc <- prev reads exactly as the disk; both images check clean.
  assert.match((await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', disk, inc])).stdout, /Images are identical/);
  for (const f of [disk, inc]) assert.equal((await run('qemu-img', ['check', f])).code, 0);
  // The bitmap was cleared by the rotation: nothing changed since this backup.
  const dev = await openImage(disk, { readOnly: true });
  t.after(() => dev.close());
  assert.deepEqual(await changedExtents(dev, 'all'), []);
});

test('changedRuns streams the two million runs of an alternating 4 TiB bitmap in bounded memory', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const disk = await fullyDirty(dir);
  // Every other granule dirty: rewrite the bitmap's data clusters (all ones now) as 0x55.
  const dev = (await openImage(disk, { readOnly: true })) as Qcow2Device;
  const ext = dev.header.bitmaps!;
  const cs = dev.clusterSize;
  const fh = await open(disk, 'r+');
  try {
    const dirBuf = Buffer.alloc(ext.directorySize);
    await fh.read(dirBuf, 0, dirBuf.length, ext.directoryOffset);
    const [entry] = decodeDirectory(dirBuf, ext.nbBitmaps);
    const tableBuf = Buffer.alloc(entry!.tableSize * 8);
    await fh.read(tableBuf, 0, tableBuf.length, entry!.tableOffset);
    const clusters = dataClusters(decodeTable(tableBuf, cs, dev.fileSize, 'all'));
    assert.equal(clusters.length, TIB4 / GRANULARITY / 8 / cs);
    for (const at of clusters) await fh.write(Buffer.alloc(cs, 0x55), 0, cs, at);
  } finally {
    await fh.close();
    await dev.close();
  }
  const { result, rssMiB } = await child(
    `const dev = await q.openImage(args[0], { readOnly: true });
     let runs = 0, bytes = 0, last = -1, ordered = true;
     try {
       for await (const r of q.changedRuns(dev, 'all')) {
         if (r.offset <= last) ordered = false;
         last = r.offset;
         runs++;
         bytes += r.length;
       }
     } finally {
       await dev.close();
     }
     return { runs, bytes, ordered };`,
    [disk],
  );
  assert.deepEqual(result, { runs: TIB4 / GRANULARITY / 2, bytes: TIB4 / 2, ordered: true });
  assert.ok(rssMiB < MAX_RSS_MIB, `peak RSS ${rssMiB.toFixed(1)} MiB`);
  // The hand-made bitmap contents are valid ones: QEMU still calls the image consistent.
  assert.equal((await run('qemu-img', ['check', disk])).code, 0);
});
