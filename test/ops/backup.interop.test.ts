/**
 * `qcow backup`: a full and two incremental backups of a disk that QEMU and qcow write between
 * them. Each backup, read through its chain (full <- inc1 <- inc2), equals the disk as it was at
 * that moment (qemu-img compare), each incremental holds only what changed, and the bitmap is
 * rotated (clean right after each backup). The chain restores with qemu-img convert.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qcow, qcowOk, qemuImg, qemuIo, run, scratch } from '../support/qemu.js';

test('full and incremental backups through a dirty bitmap read back as the disk did at each point', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const disk = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', disk, '64M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x22 30M 2M', disk]);

  const r0 = await qcowOk(['backup', '-B', 'chk', disk, join(dir, 'full.qcow2')], { cwd: dir });
  assert.match(r0.stdout, /Full backup written/);
  await copyFile(disk, join(dir, 'at0.qcow2'));

  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x33 1M 64k', '-c', 'write -z 31M 512k', disk]);
  await qcowOk(['io', '-c', 'write -P 0x44 50M 100k', '-c', 'discard 4M 1M', disk]);
  const r1 = await qcowOk(['backup', '-B', 'chk', '-b', 'full.qcow2', disk, join(dir, 'inc1.qcow2')], { cwd: dir });
  assert.match(r1.stdout, /Incremental backup written/);
  await copyFile(disk, join(dir, 'at1.qcow2'));

  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x55 60M 4k', disk]);
  await qcowOk(['backup', '-B', 'chk', '-b', 'inc1.qcow2', disk, join(dir, 'inc2.qcow2')], { cwd: dir });
  await copyFile(disk, join(dir, 'at2.qcow2'));

  for (const [backupFile, at] of [
    ['full.qcow2', 'at0.qcow2'],
    ['inc1.qcow2', 'at1.qcow2'],
    ['inc2.qcow2', 'at2.qcow2'],
  ]) {
    const c = await run('qemu-img', ['compare', join(dir, at), join(dir, backupFile)]);
    assert.equal(c.code, 0, `${backupFile}: ${c.stdout}${c.stderr}`);
    assert.equal((await run('qemu-img', ['check', join(dir, backupFile)])).code, 0);
  }
  // Incrementals hold what changed, not the disk.
  assert.ok((await stat(join(dir, 'inc2.qcow2'))).size < (await stat(join(dir, 'full.qcow2'))).size / 4);
  // The bitmap was rotated: nothing changed since the last backup.
  const info = JSON.parse((await qemuImg(['info', '--output=json', disk])).stdout);
  assert.deepEqual(info['format-specific'].data.bitmaps, [{ flags: ['auto'], name: 'chk', granularity: 65536 }]);
  // A restore is a plain convert of the newest backup.
  await qemuImg(['convert', '-O', 'raw', join(dir, 'inc2.qcow2'), join(dir, 'restored.raw')]);
  assert.equal((await run('qemu-img', ['compare', join(dir, 'at2.qcow2'), join(dir, 'restored.raw')])).code, 0);
  // An incremental without the bitmap is refused with one line.
  const bad = await qcow(['backup', '-B', 'nope', '-b', 'inc2.qcow2', disk, join(dir, 'inc3.qcow2')], { cwd: dir });
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /Dirty bitmap 'nope' not found/);
});
