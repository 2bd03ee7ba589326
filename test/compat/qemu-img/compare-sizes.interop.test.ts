/**
 * qemu-img compare of images of different sizes: the "Image size mismatch" warning comes only
 * when the comparison reaches the part one image alone has (identical images, or a difference
 * there); a difference in the common part is reported alone. Output and exit code as qemu-img's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('compare of images of different sizes prints what qemu-img prints', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const cases: Array<[string, string[]]> = [
    ['identical where both have data', []],
    ['a difference in the common part', ['write -P 7 64k 4k']],
    ['a difference past the smaller image', ['write -P 7 1M 4k']],
  ];
  for (const [what, writes] of cases) {
    await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '2M'], dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', 'b.qcow2', '1M'], dir);
    for (const cmd of writes) await qemuIo(['-f', 'qcow2', '-c', cmd, 'a.qcow2'], dir);
    for (const args of [[], ['-s']]) {
      const want = await run('qemu-img', ['compare', ...args, 'a.qcow2', 'b.qcow2'], { cwd: dir });
      const got = await run(COMPAT_IMG, ['compare', ...args, 'a.qcow2', 'b.qcow2'], { cwd: dir });
      assert.deepEqual([got.code, got.stdout], [want.code, want.stdout], `${what} ${args.join(' ')}`);
    }
  }
});
