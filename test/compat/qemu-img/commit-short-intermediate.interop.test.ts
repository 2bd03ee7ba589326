/**
 * qemu-img commit -b BASE through an image between the overlay and the base that is shorter than
 * both (iotest 274's chain: base 2 MiB of data, mid 1 MiB, top 2 MiB): the overlay reads zeros past
 * mid's end, so committing into the base writes zeros there, as QEMU does. Before, the base kept
 * its old data in that range and read differently from the overlay it was committed from. The
 * chain is made by QEMU's programs; the base after our commit must equal the base after QEMU's
 * (map, contents) and pass qemu-img check.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

async function committed(tool: string, dir: string, p: string): Promise<{ commit: string; map: string; zeros: number; ones: number; check: number }> {
  await qemuImg(['create', '-q', '-f', 'qcow2', `${p}base`, '2M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${p}base`, '-F', 'qcow2', `${p}mid`, '1M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${p}mid`, '-F', 'qcow2', `${p}top`, '2M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 2M', `${p}base`], dir);
  const commit = await run(tool, ['commit', '-b', `${p}base`, `${p}top`], { cwd: dir });
  return {
    commit: `${commit.code} ${commit.stdout}${commit.stderr}`,
    map: (await run('qemu-img', ['map', '--output=json', `${p}base`], { cwd: dir })).stdout,
    zeros: (await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0 1M 1M', `${p}base`], { cwd: dir })).code,
    ones: (await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 1 0 1M', `${p}base`], { cwd: dir })).code,
    check: (await run('qemu-img', ['check', `${p}base`], { cwd: dir })).code,
  };
}

test('commit -b through a shorter intermediate image writes zeros past its end, as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const want = await committed('qemu-img', dir, 'q-');
  const got = await committed(COMPAT_IMG, dir, 'o-');
  assert.deepEqual(got, want);
  // The case the comparison is about, stated: the base reads zeros past mid's end.
  assert.equal(got.zeros, 0);
  assert.equal(got.check, 0);
});
