/**
 * qemu-io's host protocol drivers named in `open -o driver=...`: each refuses the kinds of file it
 * does not serve (a directory, a character device for `file`) with QEMU's words, a directory
 * opened for writing fails on the open itself, and a character device is fine for `host_device`
 * and `host_cdrom`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

test('compat/qemu-io: file, host_device and host_cdrom refuse what QEMU refuses', needs('qemu-io'), async (t) => {
  const dir = join(await scratch(t), 'not-a-file');
  await mkdir(dir);
  for (const driver of ['file', 'host_device', 'host_cdrom']) {
    for (const ro of ['-r ', '']) {
      for (const target of [dir, '/dev/null,locking=off']) {
        const cmd = `open ${ro}-o driver=${driver},filename=${target}`;
        const ours = await run(COMPAT_QEMU_IO, ['-c', cmd]);
        const theirs = await run('qemu-io', ['-c', cmd]);
        assert.deepEqual({ code: ours.code, out: ours.stdout + ours.stderr }, { code: theirs.code, out: theirs.stdout + theirs.stderr }, cmd);
      }
    }
  }
});
