/**
 * Safe rebase where the old backing chain reads zeros and the new one has data: qemu-img 7.2
 * writes the old (zero) bytes as data, and writes zeroes only past the old backing file's end.
 * The drop-in must leave the same map as qemu-img.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('rebase writes zeros of the old chain as data, and as zeroes past its end, as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const maps: string[] = [];
  for (const [tool, p] of [
    ['qemu-img', 'q'],
    [COMPAT_IMG, 'c'],
  ] as const) {
    // Old: 11 -- (ends at 128k); new: 22 22 22 22 (256k); the overlay holds nothing.
    await qemuImg(['create', '-q', '-f', 'qcow2', `${p}-old.qcow2`, '128k'], dir);
    await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', `${p}-old.qcow2`], dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', `${p}-new.qcow2`, '256k'], dir);
    await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x22 0 256k', `${p}-new.qcow2`], dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${p}-old.qcow2`, '-F', 'qcow2', `${p}.qcow2`, '256k'], dir);
    const r = await run(tool, ['rebase', '-f', 'qcow2', '-b', `${p}-new.qcow2`, '-F', 'qcow2', `${p}.qcow2`], { cwd: dir });
    assert.equal(r.code, 0, r.stderr);
    const m = await run('qemu-img', ['map', '--output=json', `${p}.qcow2`], { cwd: dir });
    maps.push(m.stdout.replace(/"offset": \d+/g, '"offset": N').replaceAll(`${p}-new`, 'NEW'));
  }
  assert.equal(maps[1], maps[0]);
});
