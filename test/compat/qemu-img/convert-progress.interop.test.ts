/**
 * qemu-img convert -p: progress goes to standard output whatever it is (here a pipe), from
 * "(0.00/100%)" through each step of the data copied to "(100.00/100%)" twice and a new line,
 * as qemu-img prints it (iotest 086); -q silences it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('convert -p prints the progress qemu-img prints', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const cases: Array<[string, string, string[]]> = [
    ['four 1 MiB runs of data in 128 MiB', '128M', ['write 0 1M', 'write 2M 1M', 'write 4M 1M', 'write 32M 1M']],
    ['no data at all', '16M', []],
    ['8 MiB all data', '8M', ['write 0 8M']],
  ];
  for (const [what, size, writes] of cases) {
    await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', size], dir);
    for (const w of writes) await qemuIo(['-f', 'qcow2', '-c', w, 'a.qcow2'], dir);
    for (const extra of [[], ['-q']]) {
      const args = ['convert', '-p', ...extra, '-f', 'qcow2', '-O', 'qcow2', 'a.qcow2', 'b.qcow2'];
      const want = await run('qemu-img', args, { cwd: dir });
      const got = await run(COMPAT_IMG, args, { cwd: dir });
      assert.deepEqual([got.code, got.stdout, got.stderr], [want.code, want.stdout, want.stderr], `${what} ${extra.join(' ')}`);
    }
  }
});
