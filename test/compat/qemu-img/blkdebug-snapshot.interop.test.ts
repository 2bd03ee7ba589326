/**
 * qemu-img snapshot -d over blkdebug failing I/O from the first cluster free on (event
 * cluster_free): the snapshot leaves the table, freeing the old table fails and is said, the
 * deletion fails, and the clusters leak, as with qemu-img (same messages, same check results).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('snapshot -d with failing frees leaks as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const conf = join(dir, 'blkdebug.conf');
  await writeFile(conf, '[inject-error]\nevent = "cluster_free"\nerrno = "5"\n');
  const outs = [];
  for (const [i, prog] of [COMPAT_IMG, 'qemu-img'].entries()) {
    const img = join(dir, `img${i}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
    await qemuIo(['-c', 'write 0 64k', img]);
    await qemuImg(['snapshot', '-c', 'foo', img]);
    const r = await run(prog, ['snapshot', '-d', 'foo', `blkdebug:${conf}:${img}`]);
    const list = await run('qemu-img', ['snapshot', '-l', img]);
    const check = await run('qemu-img', ['check', img]);
    outs.push({ code: r.code, out: r.stdout, err: r.stderr.replaceAll(img, 'IMG'), list: list.stdout, check: check.stdout.replaceAll(img, 'IMG'), checkCode: check.code });
  }
  assert.deepEqual(outs[0], outs[1]);
});
