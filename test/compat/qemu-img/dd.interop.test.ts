/**
 * compat/qemu-img dd against the real qemu-img dd: the same output image (size and guest bytes)
 * for block sizes, counts and skips, and the same messages and exit codes for bad arguments.
 * `qcow dd` takes the same operands.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qcowOk, qemuGuestSha256, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

async function source(dir: string): Promise<string> {
  const src = join(dir, 'src.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', src, '1M']);
  await qemuIo(['-c', 'write -P 0xa 0 300k', '-c', 'write -P 0xb 300k 100k', '-c', 'write -P 0xc 1000k 24k', src]);
  return src;
}

async function virtualSize(file: string): Promise<number> {
  const r = await qemuImg(['info', '--output=json', file]);
  return (JSON.parse(r.stdout) as { 'virtual-size': number })['virtual-size'];
}

test('qemu-img dd: the same output image as QEMU', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = await source(dir);
  const cases = [[], ['bs=5'], ['bs=1999', '-O', 'qcow2'], ['bs=64k', 'count=3'], ['count=2', 'skip=1'], ['bs=1K', 'skip=100', '-O', 'qcow2'], ['bs=1.5k', 'count=1k'], ['skip=3000'], ['bs=1K', 'count=0']];
  for (const extra of cases) {
    const ours = join(dir, 'ours.out');
    const theirs = join(dir, 'theirs.out');
    const a = await run(COMPAT_QEMU_IMG, ['dd', `if=${src}`, `of=${ours}`, ...extra]);
    const b = await run('qemu-img', ['dd', `if=${src}`, `of=${theirs}`, ...extra]);
    assert.deepEqual({ code: a.code, stdout: a.stdout, stderr: a.stderr.replaceAll(ours, theirs) }, b, extra.join(' '));
    const fmt = extra.includes('qcow2') ? 'qcow2' : 'raw';
    assert.equal(await virtualSize(ours), await virtualSize(theirs), extra.join(' '));
    assert.equal(await qemuGuestSha256(['-f', fmt, ours]), await qemuGuestSha256(['-f', fmt, theirs]), extra.join(' '));
    await rm(ours);
    await rm(theirs);
  }
});

test('qcow dd: the operands of qemu-img dd', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = await source(dir);
  const ours = join(dir, 'ours.qcow2');
  const theirs = join(dir, 'theirs.qcow2');
  await qcowOk(['dd', '-O', 'qcow2', 'bs=4k', 'skip=10', 'count=200', `if=${src}`, `of=${ours}`]);
  await qemuImg(['dd', '-O', 'qcow2', 'bs=4k', 'skip=10', 'count=200', `if=${src}`, `of=${theirs}`]);
  assert.equal(await qemuGuestSha256(['-f', 'qcow2', ours]), await qemuGuestSha256(['-f', 'qcow2', theirs]));
  assert.equal(await virtualSize(ours), 190 * 4096);
});

test('qemu-img dd: bad arguments are refused as QEMU refuses them', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'a.qcow2'), '64k']);
  const cases = [
    ['bs=0'],
    ['bs=x'],
    ['bs=3G'],
    ['bs=1.5', 'if=a.qcow2', 'of=o'],
    ['count=-1'],
    ['skip=x'],
    ['foo'],
    ['foo=1'],
    ['if=a.qcow2'],
    [],
    ['if=a.qcow2', 'of=o', '-O', 'bogus'],
    ['if=nope', 'of=o'],
    ['if=a.qcow2', 'of=nodir/o'],
    ['-x', 'if=a.qcow2', 'of=o'],
    ['-f'],
  ];
  for (const args of cases) {
    const a = await run(COMPAT_QEMU_IMG, ['dd', ...args], { cwd: dir });
    const b = await run('qemu-img', ['dd', ...args], { cwd: dir });
    assert.deepEqual(a, b, args.join(' '));
    assert.equal(b.code, 1, args.join(' '));
  }
});
