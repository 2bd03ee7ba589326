/**
 * qemu-img convert --salvage through the drop-in (and so qcow convert --salvage): over a source
 * whose blkdebug filter fails some block-status queries and reads, both programs print the same
 * warnings in the same order, exit 0, and write the same image (unreadable sectors as zeros,
 * sectors of unknown status copied). Without --salvage both fail.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

function source(file: string): string {
  const rule = (iotype: string, sector: number) => ({ event: 'none', iotype, errno: 5, sector });
  return `json:${JSON.stringify({
    driver: 'blkdebug',
    image: { driver: 'qcow2', file: { driver: 'file', filename: file } },
    'inject-error': [rule('block-status', 2064), rule('block-status', 4097), rule('read', 4097), rule('read', 300), ...[0, 1, 2].map((i) => rule('read', 6000 + i))],
  })}`;
}

test('convert --salvage warns and goes on as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'src.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', src, '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 42 0 3M', src]);
  const results = [];
  for (const [prog, out] of [
    ['qemu-img', 'theirs.qcow2'],
    [COMPAT_IMG, 'ours.qcow2'],
  ] as const) {
    const plain = await run(prog, ['convert', '-O', 'qcow2', source(src), join(dir, `plain-${out}`)]);
    assert.equal(plain.code, 1, `${prog} without --salvage fails`);
    const r = await run(prog, ['convert', '--salvage', '-O', 'qcow2', source(src), join(dir, out)]);
    assert.equal(r.code, 0, r.stderr);
    results.push(r.stderr);
  }
  assert.match(results[0]!, /warning: error while reading block status at offset 1056768: Input\/output error/);
  assert.equal(results[1], results[0]);
  assert.equal((await run('qemu-img', ['compare', join(dir, 'theirs.qcow2'), join(dir, 'ours.qcow2')])).code, 0);
  // -q keeps the warnings back.
  const quiet = await run(COMPAT_IMG, ['convert', '-q', '--salvage', '-O', 'qcow2', source(src), join(dir, 'quiet.qcow2')]);
  assert.equal(quiet.code, 0);
  assert.equal(quiet.stderr, '');
});
