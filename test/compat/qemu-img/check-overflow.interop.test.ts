/**
 * compat/qemu-img check on a cluster referenced more often than the refcount width can count
 * (two L2 entries for one data cluster with refcount_bits=1): the error line and QEMU's hint after
 * it, then the summary, as qemu-img prints them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('compat/qemu-img check reports a refcount overflow with qemu-img hint', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 't.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', img, '64M']);
  await qemuIo(['-c', 'write 0 64k', img]);
  // The L2 table is the fifth cluster (0x40000) and its first entry points at 0x50000: the second
  // entry now points there too.
  const fh = await open(img, 'r+');
  await fh.write(Buffer.from('8000000000050000', 'hex'), 0, 8, 0x40008);
  await fh.close();
  const copy = join(dir, 'copy.qcow2');
  await copyFile(img, copy);
  const ours = await run(COMPAT_QEMU_IMG, ['check', img]);
  const theirs = await run('qemu-img', ['check', copy]);
  assert.deepEqual({ code: ours.code, out: ours.stdout + ours.stderr.replaceAll(img, 'IMG') }, { code: theirs.code, out: theirs.stdout + theirs.stderr.replaceAll(copy, 'IMG') });
});
