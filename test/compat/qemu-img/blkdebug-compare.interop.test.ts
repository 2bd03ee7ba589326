/**
 * qemu-img compare over a blkdebug node that fails data reads (`blkdebug:CONF:IMG`): qemu-img
 * names the offset and the image of the read that failed and exits 4; with a size difference, its
 * warning (standard output) follows the error in a pipe. Output and exit code as qemu-img's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('compare reports a failed read as qemu-img does (exit 4)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const conf = join(dir, 'blkdebug.conf');
  await writeFile(conf, '[inject-error]\nevent = "read_aio"\nerrno = "5"\nonce ="off"\n');
  for (const [what, otherSize, at] of [['same size', '4M', '0'], ['smaller other image', '0', '0'], ['data further in', '4M', '1M']] as const) {
    await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '4M'], dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', 'b.qcow2', otherSize], dir);
    await qemuIo(['-f', 'qcow2', '-c', `write -P 7 ${at} 512`, 'a.qcow2'], dir);
    for (const pair of [[`blkdebug:${conf}:a.qcow2`, 'b.qcow2'], ['b.qcow2', `blkdebug:${conf}:a.qcow2`]]) {
      const want = await run('qemu-img', ['compare', ...pair], { cwd: dir });
      const got = await run(COMPAT_IMG, ['compare', ...pair], { cwd: dir });
      assert.deepEqual([got.code, got.stdout, got.stderr], [want.code, want.stdout, want.stderr], `${what}: ${pair.join(' ')}`);
    }
  }
});
