/**
 * qemu-img beside another process that holds an image open for writing (a running VM; here QEMU's
 * qemu-io waiting on its stdin), command by command, with QEMU's qemu-img and ours on the same
 * image and the same holder:
 * - check -U and compare -U read the image (they share it); without -U they fail on the shared
 *   "write" lock;
 * - commit wants to write the top image, so its refusal names the "write" lock (not the shared one
 *   a reader misses);
 * - -U where the command writes (bench -w, check -r) is refused before any lock is tried, and so
 *   is -U beside --image-opts that say force-share=off;
 * - create over the held image names the "write" lock with QEMU's hint line, while create of an
 *   overlay over it succeeds (the backing file is only looked at, shared with everyone).
 * Then the overlay is checked by QEMU once the holder is gone.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { holdWithQemuIo, needs, qemuImg, run, scratch } from '../../support/qemu.js';
import { needsQemuLocks } from '../../support/addon.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

test('qemu-img beside a writer: -U reads, commit names the write lock, -U with writing is refused, an overlay may be made', { ...needs('qemu-img', 'qemu-io'), ...needsQemuLocks() }, async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const img = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', img], dir);
  const holder = await holdWithQemuIo(t, img);
  const overlay = join(dir, 'overlay.qcow2');
  const cases: string[][] = [
    ['check', img],
    ['check', '-U', img],
    ['check', '-U', '-r', 'all', img],
    ['compare', img, img],
    ['compare', '-U', img, img],
    ['commit', img],
    ['bench', '-U', '-w', '-c', '1', img],
    ['info', '-U', '--image-opts', `driver=qcow2,file.filename=${img},force-share=off`],
    ['create', '-f', 'qcow2', img, '-b', base, '-F', 'qcow2'],
    ['create', '-q', '-f', 'qcow2', '-b', img, '-F', 'qcow2', overlay],
  ];
  for (const args of cases) {
    const want = await run('qemu-img', args);
    await rm(overlay, { force: true });
    const got = await run(COMPAT_IMG, args);
    assert.deepEqual(got, want, args.join(' '));
  }
  // What the comparison is about, stated.
  assert.equal((await run(COMPAT_IMG, ['check', '-U', img])).code, 0);
  assert.equal((await run(COMPAT_IMG, ['compare', '-U', img, img])).code, 0);
  assert.match((await run(COMPAT_IMG, ['commit', img])).stderr, /Failed to get "write" lock\nIs another process using the image/);
  assert.match((await run(COMPAT_IMG, ['bench', '-U', '-w', '-c', '1', img])).stderr, /force-share=on can only be used with read-only images/);
  assert.match((await run(COMPAT_IMG, ['info', '-U', '--image-opts', `driver=qcow2,file.filename=${img},force-share=off`])).stderr, /^qemu-img: --force-share\/-U conflicts with image options\n$/);
  assert.equal((await run(COMPAT_IMG, ['create', '-f', 'qcow2', img, '-b', base, '-F', 'qcow2'])).stderr, `qemu-img: ${img}: Failed to get "write" lock\nIs another process using the image [${img}]?\n`);
  // qemu-io's open command: its own -o driver=null-co is the node, whatever -f says.
  for (const args of [['-f', 'qcow2', '-c', 'open -r -U -o driver=null-co,force-share=on'], ['-f', 'qcow2', '-c', 'open -r -U -o driver=null-co,force-share=off']]) {
    assert.deepEqual(await run(COMPAT_IO, args), await run('qemu-io', args), args.join(' '));
  }
  // The overlay ours made over the held image, once the holder is gone: QEMU finds it clean.
  await holder.release();
  const made = await run(COMPAT_IMG, ['create', '-q', '-f', 'qcow2', '-b', img, '-F', 'qcow2', overlay]);
  assert.equal(made.code, 0, made.stderr);
  const checked = await run('qemu-img', ['check', overlay]);
  assert.equal(checked.code, 0, checked.stdout + checked.stderr);
});
