/**
 * The snapshot table of `snapshot -l` and `info`: a name as long as its column or longer stays
 * apart from the VM state size by a space, as with qemu-img (whose fields a script can split on
 * blanks). Both ways: snapshots qemu-img took, listed by us, and snapshots we took, listed by both.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

/** Names shorter than the column, as long as it (16 characters and a space), longer, and much longer. */
const NAMES = ['s', 'n'.repeat(16), 'x'.repeat(17), 'y'.repeat(18), 'z'.repeat(52)];

async function listings(dir: string, img: string): Promise<void> {
  for (const args of [['snapshot', '-l', img], ['info', img]]) {
    const want = await run('qemu-img', args, { cwd: dir });
    const got = await run(COMPAT, args, { cwd: dir });
    assert.equal(got.code, 0, got.stderr);
    assert.equal(got.stdout, want.stdout, args.join(' '));
  }
  const rows = (await run(COMPAT, ['snapshot', '-l', img], { cwd: dir })).stdout.trim().split('\n').slice(2);
  assert.equal(rows.length, NAMES.length);
  for (const [i, row] of rows.entries()) {
    // ID, name, size value and unit, date, time, VM clock: seven fields split on blanks.
    assert.deepEqual(row.trim().split(/\s+/).slice(0, 3), [String(i + 1), NAMES[i], '0'], row);
  }
}

test('snapshot -l and info: long snapshot names stay apart from the VM state size (qemu-img took them)', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'q.qcow2', '1M'], dir);
  for (const n of NAMES) await qemuImg(['snapshot', '-c', n, 'q.qcow2'], dir);
  await listings(dir, 'q.qcow2');
});

test('snapshot -l and info: long snapshot names stay apart from the VM state size (we took them)', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'c.qcow2', '1M'], dir);
  for (const n of NAMES) {
    const r = await run(COMPAT, ['snapshot', '-c', n, 'c.qcow2'], { cwd: dir });
    assert.equal(r.code, 0, r.stderr);
  }
  await listings(dir, 'c.qcow2');
  const check = await run('qemu-img', ['check', 'c.qcow2'], { cwd: dir });
  assert.equal(check.code, 0, check.stdout + check.stderr);
});
