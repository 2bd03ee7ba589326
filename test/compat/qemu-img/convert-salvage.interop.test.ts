/**
 * qemu-img convert --salvage through the drop-in (and so qcow convert --salvage): over a source
 * whose blkdebug filter fails some block-status queries and reads, both programs print the same
 * warnings in the same order, exit 0, and write the same image (unreadable sectors as zeros,
 * sectors of unknown status copied). Without --salvage both fail.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open, readFile } from 'node:fs/promises';
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

test('convert --salvage goes on past a corrupt backing file as qemu-img does (its block status failing below the top)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x22 0 128k', '-c', 'write -P 0x33 512k 64k', base]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x44 256k 64k', top]);
  // The base's entry for its second cluster points at an unaligned host offset.
  const fh = await open(base, 'r+');
  try {
    const header = new Uint8Array(48);
    await fh.read(header, 0, 48, 0);
    const l1 = Number(new DataView(header.buffer).getBigUint64(40));
    const entry = new Uint8Array(8);
    await fh.read(entry, 0, 8, l1);
    const l2 = Number(new DataView(entry.buffer).getBigUint64(0) & 0x00fffffffffffe00n);
    await fh.read(entry, 0, 8, l2 + 8);
    const view = new DataView(entry.buffer);
    view.setBigUint64(0, view.getBigUint64(0) + 0x200n);
    await fh.write(entry, 0, 8, l2 + 8);
  } finally {
    await fh.close();
  }
  const warnings = [];
  for (const [prog, out] of [
    ['qemu-img', 'theirs.raw'],
    [COMPAT_IMG, 'ours.raw'],
  ] as const) {
    const r = await run(prog, ['convert', '--salvage', '-O', 'raw', top, join(dir, out)]);
    assert.equal(r.code, 0, `${prog}: ${r.stderr.split('\n').slice(-3).join('\n')}`);
    warnings.push(r.stderr.split('\n').sort());
  }
  assert.deepEqual(await readFile(join(dir, 'ours.raw')), await readFile(join(dir, 'theirs.raw')));
  // The same warnings (ours give the unreadable sectors' after a run's statuses, not in between).
  assert.deepEqual(warnings[1], warnings[0]);
});
