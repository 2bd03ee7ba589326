/**
 * qemu-io's -U (force-share, also `force-share=on` in an option list): a read-only look at an image
 * that another process holds open for writing, as QEMU's iotests do with `qemu-io -rU -c map`
 * while a VM streams into the image. Without -U that open fails on the writer's lock; with it the
 * open shares every permission. -U on a writable open is refused before any file is touched.
 * Each case runs QEMU's qemu-io and ours against the same image, held by QEMU's qemu-io; a refusal
 * names the lock it could not get, with QEMU's hint line.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { holdWithQemuIo, maskQemuIoTiming, needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { needsQemuLocks } from '../../support/addon.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

test('qemu-io -U reads an image another process holds open for writing, as QEMU does; -U on a writable open is refused', { ...needs('qemu-img', 'qemu-io'), ...needsQemuLocks() }, async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'a.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x5a 64k 64k', img], dir);
  // The writer: QEMU's qemu-io with the image open read-write. Once its lock is held, a plain
  // read-only open by QEMU's qemu-io fails, on the write lock.
  const { refused } = await holdWithQemuIo(t, img, ['qemu-io', ['-f', 'qcow2', '-r', '-c', 'map', img]]);
  assert.match(refused.stderr, /Failed to get shared "write" lock/);
  const cases: string[][] = [
    ['-f', 'qcow2', '-rU', '-c', 'map', '-c', 'read -P 0x5a 64k 64k', img],
    ['-f', 'qcow2', '-U', '-r', '-c', 'map', img],
    ['-r', '--image-opts', '-c', 'map', `driver=qcow2,file.filename=${img},force-share=on`],
    // Refused: -U (or force-share=on) without -r, and a read-only open that does not share.
    ['-f', 'qcow2', '-U', '-c', 'map', img],
    ['--image-opts', '-c', 'map', `driver=qcow2,file.filename=${img},force-share=on`],
    ['-c', `open -U -o driver=qcow2 ${img}`, '-c', 'map'],
    ['-f', 'qcow2', '-r', '-c', 'map', img],
  ];
  for (const args of cases) {
    const want = await run('qemu-io', args);
    const got = await run(COMPAT_IO, args);
    assert.deepEqual({ ...got, stdout: maskQemuIoTiming(got.stdout) }, { ...want, stdout: maskQemuIoTiming(want.stdout) }, args.join(' '));
  }
  // qemu-img's refusal names the same lock (and -U lets it look).
  const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
  for (const args of [['info', img], ['info', '-U', img]]) {
    const want = await run('qemu-img', args);
    assert.deepEqual(await run(COMPAT_IMG, args), want, args.join(' '));
  }
  // The cases the comparison is about, stated.
  assert.match((await run(COMPAT_IO, cases[0]!)).stdout, /64 KiB \(0x10000\) bytes +allocated at offset 64 KiB/);
  assert.match((await run(COMPAT_IO, cases[3]!)).stderr, /force-share=on can only be used with read-only images/);
});
