/**
 * qemu-img create -f file: QEMU's file protocol driver named as the format (iotest 142 creates
 * its O_DIRECT alignment image so). The result is a plain file of the size given, created with
 * raw's options (preallocation allocates it); the Formatting line says fmt=file. Output, exit
 * code and the file left behind as qemu-img's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('create -f file makes the plain file qemu-img makes', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const cases = [['1M'], ['-o', 'preallocation=full', '1M'], ['-o', 'nocow=on', '64k'], ['-o', 'cluster_size=4k', '64k'], []];
  for (const [i, rest] of cases.entries()) {
    const result = async (tool: string, name: string) => {
      const r = await run(tool, ['create', '-f', 'file', ...rest.slice(0, -1), name, ...rest.slice(-1)], { cwd: dir });
      const st = statSync(join(dir, name), { throwIfNoEntry: false });
      // Allocation as a yes/no: the file system may round what it allocates.
      return { code: r.code, stdout: r.stdout.replace(name, 'NAME'), stderr: r.stderr.replaceAll(name, 'NAME'), size: st?.size, allocated: st ? st.blocks * 512 >= st.size && st.size > 0 : undefined };
    };
    const want = await result('qemu-img', `q${i}.img`);
    const got = await result(COMPAT_IMG, `o${i}.img`);
    assert.deepEqual(got, want, rest.join(' '));
  }
  // The case the comparison is about, stated.
  assert.equal((await run(COMPAT_IMG, ['create', '-f', 'file', 'x.img', '1M'], { cwd: dir })).stdout, "Formatting 'x.img', fmt=file size=1048576\n");
  assert.equal(statSync(join(dir, 'x.img')).size, 1048576);
});
