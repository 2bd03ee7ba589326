/**
 * compat/qemu-img check against qemu-img check on images with wrong refcounts, with and without
 * repairs: the same stdout, stderr and exit code, line for line. Covers the two ways a check can
 * end besides a summary: `-r leaks` on an image that needs a rebuild (qemu stops with EIO and shows
 * no summary) and `-r all` rebuilding the refcount structure (the old structure's clusters are
 * then repaired as leaks, once).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdir, open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { firstL2Offset, headerOf } from '../../support/qcow2-edit.js';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

/** Set 16-bit refcounts in the first refcount block: [cluster, refcount] pairs. */
async function setRefcounts(file: string, counts: [number, number][]): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const { header } = await headerOf(fh);
    const table = new Uint8Array(8);
    await fh.read(table, 0, 8, header.refcountTableOffset);
    const block = Number(new DataView(table.buffer).getBigUint64(0));
    for (const [cluster, count] of counts) await fh.write(new Uint8Array([count >> 8, count & 0xff]), 0, 2, block + 2 * cluster);
  } finally {
    await fh.close();
  }
}

test('compat/qemu-img check and its repairs print what qemu-img prints for wrong refcounts', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const orig = join(dir, 'orig.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', orig, '16M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write 0 512k', '-c', 'write 4M 128k', orig]);
  // Clusters 4 and 5 are an L2 table and data, 6 and 9 data, 40 unused (see `qemu-img map`).
  const breakages: [string, [number, number][]][] = [
    ['a used cluster counted 0', [[5, 0]]],
    ['an L2 table counted 0', [[4, 0]]],
    ['a cluster counted twice', [[6, 2]]],
    ['an unused cluster counted', [[40, 1]]],
    ['all of these', [[5, 0], [6, 2], [40, 1], [9, 3]]],
  ];
  const modes = [[], ['-r', 'leaks'], ['-r', 'all'], ['--output=json', '-r', 'leaks'], ['--output=json', '-r', 'all']];
  for (const [how, counts] of breakages) {
    for (const mode of modes) {
      const outcomes = [];
      for (const [side, program] of [['theirs', 'qemu-img'], ['ours', COMPAT_QEMU_IMG]] as const) {
        // The same file name on both sides: qemu-img's JSON names it.
        await mkdir(join(dir, side), { recursive: true });
        const file = join(dir, side, 'x.qcow2');
        await copyFile(orig, file);
        await setRefcounts(file, counts);
        const r = await run(program, ['check', ...mode, 'x.qcow2'], { cwd: join(dir, side) });
        const after = await run('qemu-img', ['check', 'x.qcow2'], { cwd: join(dir, side) });
        outcomes.push({ code: r.code, stdout: r.stdout, stderr: r.stderr, checkAfter: after.code });
      }
      assert.deepEqual(outcomes[1], outcomes[0], `${how}, check ${mode.join(' ')}`);
    }
  }
});

test('compat/qemu-img check names a compressed cluster with the copied flag as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const plain = join(dir, 'plain.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', plain, '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 7 0 256k', plain]);
  const packed = join(dir, 'packed.qcow2');
  await qemuImg(['convert', '-c', '-O', 'qcow2', plain, packed]);
  // Set the copied flag (bit 63) on the first L2 entry, a compressed cluster.
  const fh = await open(packed, 'r+');
  try {
    const l2 = await firstL2Offset(fh);
    const entry = new Uint8Array(1);
    await fh.read(entry, 0, 1, l2);
    assert.equal(entry[0]! & 0x40, 0x40, 'the first cluster is compressed');
    await fh.write(new Uint8Array([entry[0]! | 0x80]), 0, 1, l2);
  } finally {
    await fh.close();
  }
  const theirs = await run('qemu-img', ['check', packed]);
  const ours = await run(COMPAT_QEMU_IMG, ['check', packed]);
  assert.match(theirs.stderr, /ERROR: coffset=0x[0-9a-f]+: copied flag must never be set for compressed clusters/);
  assert.deepEqual([ours.code, ours.stdout, ours.stderr], [theirs.code, theirs.stdout, theirs.stderr]);
});

test('compat/qemu-img check counts a bitmap table past the end of the file as qemu-img does', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'x.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
  await qemuImg(['bitmap', '--add', file, 'bad']);
  await qemuImg(['bitmap', '--add', file, 'good']);
  // Move the first bitmap's table a cluster and more past the end of the file, still aligned.
  const fh = await open(file, 'r+');
  try {
    const { header } = await headerOf(fh);
    await fh.write(new Uint8Array([0x10]), 0, 1, header.bitmaps!.directoryOffset + 5);
  } finally {
    await fh.close();
  }
  for (const mode of [[], ['--output=json']]) {
    const theirs = await run('qemu-img', ['check', ...mode, 'x.qcow2'], { cwd: dir });
    const ours = await run(COMPAT_QEMU_IMG, ['check', ...mode, 'x.qcow2'], { cwd: dir });
    assert.match(theirs.stderr, /ERROR: counting reference for region exceeding the end of the file/);
    assert.deepEqual([ours.code, ours.stdout, ours.stderr], [theirs.code, theirs.stdout, theirs.stderr], mode.join(' '));
  }
});
