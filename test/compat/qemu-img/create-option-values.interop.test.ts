/**
 * qemu-img create with -o values it cannot parse: a size option gets QEMU's complaint plus its
 * hint about the suffixes (iotest 049), a size past 2^64 its "out of range" line, a number option
 * "expects a number". Messages and exit codes as qemu-img's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('create -o with values that do not parse says what qemu-img says', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const cases = ['size=-1k', 'size=foobar', 'size=99999999999999999999999', 'cluster_size=1kilobyte', 'refcount_bits=foo'];
  for (const o of cases) {
    const args = ['create', '-f', 'qcow2', '-o', o, 'x.qcow2', ...(o.startsWith('size=') ? [] : ['1M'])];
    const want = await run('qemu-img', args, { cwd: dir });
    const got = await run(COMPAT_IMG, args, { cwd: dir });
    assert.deepEqual([got.code, got.stdout, got.stderr], [want.code, want.stdout, want.stderr], o);
  }
});
