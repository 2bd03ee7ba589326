/**
 * compat/qemu-io's reopen refuses what qemu-io's does, in its words and order: booleans that are
 * not on/off, -r/-w or -c beside the options they conflict with, qcow2 runtime options out of
 * range (caches, overlap checks, the clean interval), and a node name or driver that would change;
 * the same values given again are fine. And QEMU's null-co driver through a json: name.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

const REOPENS = [
  'reopen -o node-name=foo',
  'reopen -o file.node-name=foo',
  'reopen -o backing.node-name=foo',
  'reopen -o driver=raw',
  'reopen -o file.driver=qcow2',
  'reopen -o driver=qcow2',
  'reopen -o file.driver=file',
  'reopen -o backing.driver=qcow2',
  'reopen -r -o read-only=on',
  'reopen -c none -o cache.direct=on',
  'reopen -c writeback -o cache.no-flush=on',
  'reopen -o read-only=foo',
  'reopen -o cache.direct=baz',
  'reopen -o auto-read-only=qux',
  'reopen -o lazy-refcounts=42',
  'reopen -o lazy-refcounts=on,pass-discard-request=on',
  'reopen -o cache-size=1M,l2-cache-size=64k,refcount-cache-size=64k',
  'reopen -o cache-size=1M,l2-cache-size=2M',
  'reopen -o l2-cache-entry-size=33k',
  'reopen -o refcount-cache-size=256T',
  'reopen -o overlap-check=constant,overlap-check.template=all',
  'reopen -o overlap-check.template=blubb',
  'reopen -o overlap-check=cached,overlap-check.active-l2=off',
  'reopen -o cache-clean-interval=-1',
  'reopen -o cache-clean-interval=10',
];

test('compat/qemu-io reopen checks its options as qemu-io does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const img = join(dir, 't.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '64M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', img]);
  const runs: string[][] = REOPENS.map((c) => ['-c', c, img]);
  runs.push(['-c', `open -o backing.node-name=foo ${img}`, '-c', 'reopen -o backing.node-name=foo']);
  runs.push(['-c', `open -o node-name=foo ${img}`, '-c', 'reopen']);
  for (const args of runs) {
    const ours = await run(COMPAT_QEMU_IO, args);
    const theirs = await run('qemu-io', args);
    assert.deepEqual({ code: ours.code, out: ours.stdout + ours.stderr }, { code: theirs.code, out: theirs.stdout + theirs.stderr }, args.join(' '));
  }
});

test('compat/qemu-io joins the options of successive reopens as qemu-io does (qcow2: overlap template, cache sizes)', needs('qemu-img', 'qemu-io'), async (t) => {
  // A new overlap mode or template replaces every old overlap option; a new cache-size the old
  // l2/refcount sizes; a refused reopen leaves the image open with what it had (iotest 137).
  const dir = await scratch(t);
  const img = join(dir, 't.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
  const sequences = [
    ['reopen -o overlap-check=constant', 'reopen -o overlap-check.template=all', 'reopen -o overlap-check=none', 'reopen -o overlap-check.inactive-l2=on', 'reopen -o overlap-check.template=cached'],
    ['reopen -o l2-cache-size=512k', 'reopen -o cache-size=1M', 'reopen -o refcount-cache-size=128k', 'reopen -o l2-cache-size=2M'],
    ['reopen -o l2-cache-size=64k,refcount-cache-size=64k', 'reopen -o cache-size=1M'],
    ['reopen -o overlap-check=blubb', 'write 0 512', 'reopen -o lazy-refcounts=on', 'reopen -o lazy-refcounts=foo', 'read 0 512'],
  ];
  for (const cmds of sequences) {
    const args = [...cmds.flatMap((c) => ['-c', c]), img];
    const clean = (s: string) => s.replace(/\d+ ops; [^\n]*/g, 'X ops');
    const ours = await run(COMPAT_QEMU_IO, args);
    const theirs = await run('qemu-io', args);
    assert.deepEqual({ code: ours.code, out: clean(ours.stdout + ours.stderr) }, { code: theirs.code, out: clean(theirs.stdout + theirs.stderr) }, cmds.join(' ; '));
  }
});

test('compat/qemu-io opens null-co through a json: name', needs('qemu-io'), async () => {
  for (const args of [
    ['-f', 'null-co', '-c', 'reopen', '-c', 'info', "json:{'driver': 'null-co', 'size': 65536}"],
    ['-c', 'write -P 1 0 512', '-c', 'read -P 0 0 512', `json:{"driver": "null-co", "size": 65536, "read-zeroes": true}`],
  ]) {
    const ours = await run(COMPAT_QEMU_IO, args);
    const theirs = await run('qemu-io', args);
    const norm = (s: string) => s.replace(/\d+ ops; .*/g, 'X');
    assert.deepEqual({ code: ours.code, out: norm(ours.stdout + ours.stderr) }, { code: theirs.code, out: norm(theirs.stdout + theirs.stderr) }, args.join(' '));
  }
});
