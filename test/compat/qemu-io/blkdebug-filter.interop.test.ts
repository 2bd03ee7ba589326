/**
 * blkdebug above a qcow2 image (`driver=blkdebug,image.driver=qcow2`) in compat/qemu-io and
 * compat/qemu-img, against QEMU's: requests shaped by align and max-transfer leave the same image,
 * and write-zeroes cut at a write-zero alignment (blkdebug's opt-write-zero, max-write-zero) leaves
 * the pieces shorter than it as written zeros (data) and the rest as zero clusters, so the maps
 * of the two programs' images agree.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

const untimed = (s: string) => s.split('\n').filter((l) => !/ ops; /.test(l)).join('\n');

const CASES: Array<[string, string, string[]]> = [
  ['align and max-transfer', 'align=4k,max-transfer=64k', ['write -P 33 1000 128k', 'read -P 33 1000 128k', 'read -P 22 0 1000']],
  ['write zeroes in pieces of max-transfer', 'align=512,max-transfer=64k,opt-write-zero=1M', ['write -z 8003584 2093056']],
  ['write zeroes at a non-power-of-two alignment', 'align=512,opt-write-zero=15M,max-write-zero=15M', ['write -z 32M 32M']],
  ['discard at a non-power-of-two alignment', 'align=512,opt-discard=15M,max-discard=15M', ['discard 80000001 30M']],
  ['block status below the alignment', 'align=4k', ['alloc 1 1', 'alloc 0x6dffff0 1000', 'alloc 127m 5P', 'map']],
];

test('blkdebug over qcow2: same output and same image as qemu-io', needs('qemu-io', 'qemu-img'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=1M', base, '128M']);
  await qemuIo(['-c', 'write -P 22 0 110M', base]);
  for (const [what, limits, commands] of CASES) {
    const results = [];
    for (const [i, [io, img]] of [[COMPAT_QEMU_IO, COMPAT_QEMU_IMG], ['qemu-io', 'qemu-img']].entries()) {
      const file = join(dir, `img${i}.qcow2`);
      await copyFile(base, file);
      const open = `open -o driver=blkdebug,image.driver=qcow2,${limits} blkdebug::${file}`;
      const r = await run(io!, ['-t', 'writeback', '-c', open, ...commands.flatMap((c) => ['-c', c])]);
      const map = await run(img!, ['map', '--image-opts', `driver=blkdebug,image.driver=qcow2,image.file.driver=file,image.file.filename=${file},${limits}`]);
      results.push({ code: r.code, out: untimed(r.stdout), err: r.stderr, map: map.stdout.replaceAll(file, 'IMG'), mapCode: map.code });
    }
    assert.deepEqual(results[0], results[1], what);
    assert.equal((await run('qemu-img', ['compare', join(dir, 'img0.qcow2'), join(dir, 'img1.qcow2')])).code, 0, what);
  }
});
