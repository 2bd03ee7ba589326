/**
 * `qemu-img snapshot -c/-a/-d` on formats without internal snapshots (qcow v1, raw): the same
 * line and exit code as qemu-img's, and the image left as it was. Before, compat/qemu-img said
 * "Could not open 'x': Could not create snapshot: Operation not supported (format qcow)".
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('snapshot actions on qcow v1 and raw fail in qemu-img words', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow', 'v1.qcow', '1M'], dir);
  await qemuImg(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
  for (const [format, file] of [['qcow', 'v1.qcow'], ['raw', 'r.raw']]) {
    const before = await readFile(join(dir, file));
    for (const action of ['-c', '-a', '-d']) {
      const args = ['snapshot', action, 'snap', file!];
      const ours = await run(COMPAT_QEMU_IMG, args, { cwd: dir });
      const theirs = await run('qemu-img', args, { cwd: dir });
      const what = `${format} ${action}`;
      // The raw image, opened writable without a format, gets the probe warning first in both;
      // qemu-img prints it twice for -a (it opens the image again to apply), ours once.
      const once = (text: string) => text.replace(/(WARNING: Image format was not specified[^]*?restrictions\.\n)\1/, '$1');
      assert.equal(ours.stderr, once(theirs.stderr), what);
      assert.equal(ours.stdout, theirs.stdout, what);
      assert.equal(ours.code, theirs.code, what);
      assert.ok(before.equals(await readFile(join(dir, file!))), `${what}: image unchanged`);
    }
  }
});

test('snapshot takes no -f, as qemu-img 7.2', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', 's.qcow2', '1M'], dir);
  const args = ['snapshot', '-f', 'qcow2', '-l', 's.qcow2'];
  const ours = await run(COMPAT_QEMU_IMG, args, { cwd: dir });
  const theirs = await run('qemu-img', args, { cwd: dir });
  assert.equal(theirs.code, 1);
  assert.equal(ours.code, theirs.code);
  assert.equal(ours.stderr, theirs.stderr);
  assert.equal(ours.stdout, '');
});
