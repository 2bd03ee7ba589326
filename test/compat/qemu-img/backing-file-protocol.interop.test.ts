/**
 * A backing file named with QEMU's file protocol prefix (`-b file:PATH`, as iotest 228 creates its
 * overlay): the name is recorded as given, and opens as PATH written, not combined with the
 * overlay's folder (QEMU leaves a name that says its protocol alone), so a relative one is taken
 * from the current folder. `info` shows the name as its own full name, as qemu-img does. Both
 * ways: QEMU's programs read what ours create, and ours what QEMU's create.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

test('a backing file named file:PATH opens as PATH, as in QEMU', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  mkdirSync(join(dir, 'sub'));
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.img', '1M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 7 0 64k', 'base.img'], dir);
  const tools = { qemu: ['qemu-img', 'qemu-io'], ours: [COMPAT_IMG, COMPAT_IO] } as const;
  for (const backing of ['file:base.img', `file:${join(dir, 'base.img')}`, 'file:missing.img']) {
    const made: Record<string, unknown> = {};
    for (const [creator, [img]] of Object.entries(tools)) {
      const top = `sub/${creator}.img`;
      const r = await run(img, ['create', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', top], { cwd: dir });
      made[creator] = { ...r, stdout: r.stdout.replace(top, 'TOP'), stderr: r.stderr.replace(top, 'TOP') };
      if (r.code !== 0) continue;
      // The image `creator` made, read by each: info (human and JSON), a read through the
      // backing file, check.
      const seen: Record<string, unknown> = {};
      for (const [reader, [rimg, rio]] of Object.entries(tools)) {
        seen[reader] = {
          info: (await run(rimg, ['info', top], { cwd: dir })).stdout,
          json: (await run(rimg, ['info', '--output=json', top], { cwd: dir })).stdout,
          read: (await run(rio, ['-c', 'read -P 7 0 64k', top], { cwd: dir })).code,
          check: (await run(rimg, ['check', top], { cwd: dir })).stdout,
        };
      }
      assert.deepEqual(seen.ours, seen.qemu, `${creator} created with -b ${backing}`);
      const ours = seen.ours as { info: string; read: number };
      assert.ok(ours.info.includes(`backing file: ${backing}\n`), ours.info);
      assert.equal(ours.read, 0);
    }
    assert.deepEqual(made.ours, made.qemu, `create -b ${backing}`);
  }
  // The refusal is the one compared above: the name is looked up as written, in the current folder.
  assert.match((await run(COMPAT_IMG, ['create', '-f', 'qcow2', '-b', 'file:missing.img', '-F', 'qcow2', 'sub/x.img'], { cwd: dir })).stderr, /Could not open 'missing.img'/);
});
