/**
 * Persistent bitmaps are stored as QEMU stores them: once per session, when the image closes,
 * every usable bitmap with a new table in directory order and then a new directory, neither
 * padded to whole clusters; a session that opens the image for writing flags the bitmaps in use
 * in place. The file therefore ends where qemu-img's does after the same edits (what measures the
 * file itself, `measure -f raw`, then agrees).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('compat/qemu-img bitmap --add leaves the file as long as qemu-img does', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const steps = [
    ['bitmap', '--add', '--granularity', '512', '-f', 'qcow2', 'IMG', 'b1'],
    ['bitmap', '--add', '-g', '2M', '-f', 'qcow2', 'IMG', 'b2'],
    ['bitmap', '--disable', '-f', 'qcow2', 'IMG', 'b1'],
    ['bitmap', '--add', '-f', 'qcow2', 'IMG', 'b3'],
  ];
  const sizes: number[][] = [];
  const measures: string[] = [];
  for (const [i, prog] of [COMPAT_QEMU_IMG, 'qemu-img'].entries()) {
    const img = join(dir, `t${i}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', img, '2T']);
    const seen: number[] = [];
    for (const step of steps) {
      const r = await run(prog, step.map((a) => (a === 'IMG' ? img : a)));
      assert.equal(r.code, 0, r.stderr);
      seen.push((await stat(img)).size);
    }
    sizes.push(seen);
    measures.push((await qemuImg(['measure', '-O', 'qcow2', '-f', 'raw', img])).stdout.replace(/^required size: \d+/m, ''));
    assert.match((await qemuImg(['check', img])).stdout, /No errors were found/);
  }
  assert.deepEqual(sizes[0], sizes[1]);
  assert.equal(measures[0], measures[1]);
});
