/**
 * qemu-img commit of an overlay that zeroes its base: qemu's active commit writes zeros with
 * unmap allowed, so the base's clusters become unallocated zero clusters (check then counts none
 * allocated and prints no allocation line). The drop-in must leave the same map and check output.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('commit of zeros unmaps the base clusters, as qemu-img commit does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const out: string[] = [];
  for (const [tool, p] of [
    ['qemu-img', 'q'],
    [COMPAT_IMG, 'c'],
  ] as const) {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', `${p}-base.qcow2`, '256k'], dir);
    await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 256k', `${p}-base.qcow2`], dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${p}-base.qcow2`, '-F', 'qcow2', `${p}.qcow2`], dir);
    await qemuIo(['-f', 'qcow2', '-c', 'write -z 0 128k', `${p}.qcow2`], dir);
    const r = await run(tool, ['commit', `${p}.qcow2`], { cwd: dir });
    assert.equal(r.code, 0, r.stderr);
    const map = await run('qemu-img', ['map', '--output=json', `${p}-base.qcow2`], { cwd: dir });
    const check = await run('qemu-img', ['check', `${p}-base.qcow2`], { cwd: dir });
    const ours = await run(COMPAT_IMG, ['check', `${p}-base.qcow2`], { cwd: dir });
    assert.equal(ours.stdout, check.stdout, 'our check agrees with qemu-img check');
    out.push(map.stdout.replace(/"offset": \d+/g, '"offset": N') + check.stdout);
  }
  assert.equal(out[1], out[0]);
});
