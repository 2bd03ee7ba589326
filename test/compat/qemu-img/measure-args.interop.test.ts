/**
 * qemu-img measure through compat/qemu-img, side by side with qemu-img: its command-line checks in
 * QEMU's order and words, sizes up to 2^63 printed exactly (or refused as qemu-img refuses them),
 * and a new raw image measured as qemu-img measures it (QEMU's file protocol allocates the first
 * block of a file it grows from empty, and so does our file store).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';
import { needsHoles } from '../../support/addon.js';
import { isValidOptionList } from '#src/compat/qemu-img/measure-args.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

async function same(args: string[], cwd: string): Promise<void> {
  const theirs = await run('qemu-img', args, { cwd });
  const ours = await run(COMPAT_QEMU_IMG, args, { cwd });
  assert.deepEqual([ours.code, ours.stdout, ours.stderr], [theirs.code, theirs.stdout, theirs.stderr], args.join(' '));
}

test('option lists as qemu-img accepts them', () => {
  for (const ok of ['a=1', 'a=1,,', 'a=b,,c']) assert.equal(isValidOptionList(ok), true, ok);
  for (const bad of ['', ',', 'a=1,', ',a=1', 'a=1,,,']) assert.equal(isValidOptionList(bad), false, bad);
});

test('measure refuses its command lines as qemu-img does', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', 't.qcow2', '1G'], dir);
  for (const args of [
    [],
    ['--size', '2G', 't.qcow2'],
    ['t.qcow2', 'a'],
    ['--object', 'secret,id=sec0,data=MTIzNDU2,format=base64'],
    ['--image-opts'],
    ['-f', 'qcow2'],
    ['-l', 'snap1'],
    ['-o', ','],
    ['-l', 'snapshot.foo=bar'],
    ['--output', 'foo'],
    ['--size', '-1'],
    ['--size', '8E'],
    ['-O', 'foo', 't.qcow2'],
  ]) {
    await same(['measure', ...args], dir);
  }
});

test('measure sizes up to 2^63, exactly', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  for (const size of ['2P', '3E', '7E']) {
    for (const fmt of ['qcow2', 'raw']) {
      for (const output of ['human', 'json']) await same(['measure', '-O', fmt, '--output', output, '--size', size], dir);
    }
  }
});

test('a new raw image has its first block allocated, as qemu-img makes it', { ...needs('qemu-img'), ...needsHoles() }, async (t) => {
  const dir = await scratch(t);
  for (const size of ['1G', '2k', '0']) {
    const [a, b] = [join(dir, `a-${size}.raw`), join(dir, `b-${size}.raw`)];
    await qemuImg(['create', '-q', '-f', 'raw', a, size]);
    const r = await run(COMPAT_QEMU_IMG, ['create', '-q', '-f', 'raw', b, size]);
    assert.equal(r.code, 0, r.stderr);
    const maps = await Promise.all([a, b].map(async (f) => (await qemuImg(['map', '--output=json', '-f', 'raw', f])).stdout));
    assert.equal(maps[1], maps[0], size);
    await same(['measure', '-O', 'qcow2', '-f', 'raw', b], dir);
  }
});
