/**
 * Emptying the overlay after qemu-img commit: a version 3 image is rebuilt all at once, as QEMU
 * does (the file cut back to header, refcount table and block, and L1 table), and each step can
 * fail through blkdebug's events, leaving an image that the next open repairs. Both programs must
 * leave the same file, say the same, and leave the same for the repair and for check.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

async function overlay(dir: string, name: string): Promise<string> {
  const base = join(dir, `${name}.base`);
  const top = join(dir, `${name}.qcow2`);
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '64M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  await qemuIo(['-c', 'write -P 7 0 64k', '-c', 'write -P 8 5M 192k', top]);
  return top;
}

test('commit empties a v3 overlay all at once, as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const seen: string[] = [];
  for (const [prog, name] of [
    ['qemu-img', 'q'],
    [COMPAT_IMG, 'c'],
  ] as const) {
    const top = await overlay(dir, name);
    const r = await run(prog, ['commit', top]);
    assert.equal(r.code, 0, r.stderr);
    const check = await run('qemu-img', ['check', top]);
    seen.push(`${(await stat(top)).size} ${check.code} ${check.stdout}`);
  }
  assert.equal(seen[1], seen[0]);
  assert.match(seen[0]!, /^262144 0 No errors/);
});

for (const event of ['l1_update', 'empty_image_prepare', 'reftable_update', 'refblock_alloc']) {
  test(`commit's emptying failing at ${event}: the same message, repair and check as qemu-img`, needs('qemu-img', 'qemu-io'), async (t) => {
    const dir = await scratch(t);
    const conf = join(dir, 'blkdebug.conf');
    await writeFile(conf, `[inject-error]\nevent = "${event}"\n`);
    const seen: string[] = [];
    for (const [prog, name] of [
      ['qemu-img', 'q'],
      [COMPAT_IMG, 'c'],
    ] as const) {
      const top = await overlay(dir, name);
      const r = await run(prog, ['commit', `blkdebug:${conf}:${top}`]);
      const reopen = await run('qemu-io', ['-c', 'close', top]);
      const check = await run('qemu-img', ['check', top]);
      seen.push([r.code, r.stdout, r.stderr, reopen.stdout, reopen.stderr, check.stdout].join('|').replaceAll(top, 'TOP'));
    }
    assert.equal(seen[1], seen[0]);
    assert.match(seen[0]!, /Failed to empty blkdebug:.*: Input\/output error/);
  });
}
