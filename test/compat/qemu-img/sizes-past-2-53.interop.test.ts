/**
 * Virtual sizes past 2^53 (whole sectors, exact as numbers below 2^62): compat/qemu-img creates
 * the same bytes as qemu-img, info prints the size exactly (not as the nearest shortest double),
 * and qemu-io opens such an image and judges its cache options against its size as qemu-io does.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';
import { byteCountText, isExactByteCount, stringifyExact } from '#src/index.js';
import { u64Size } from '#src/core/bytes.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

test('byte counts past 2^53: exact whole sectors, printed as integers', () => {
  assert.equal(isExactByteCount(2 ** 55), true);
  assert.equal(isExactByteCount(2 ** 53 + 512), true);
  assert.equal(isExactByteCount(2 ** 53 + 2), false);
  assert.equal(isExactByteCount(2 ** 62), true);
  assert.equal(isExactByteCount(2 ** 63), false);
  assert.equal(byteCountText(2 ** 55), '36028797018963968');
  assert.equal(stringifyExact({ a: 2 ** 55, b: [1.5, 'x', 2 ** 53 + 512] }), '{"a":36028797018963968,"b":[1.5,"x",9007199254741504]}');
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, 2n ** 55n + 1000n);
  // Rounded down to whole sectors, as QEMU counts a disk.
  assert.equal(u64Size(b, 0), 2 ** 55 + 512);
  new DataView(b.buffer).setBigUint64(0, 2n ** 62n);
  assert.throws(() => u64Size(b, 0), { code: 'QCOW_CORRUPT' });
});

test('a 32 PiB qcow2 image: created, shown and opened as QEMU does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const [a, b] = [join(dir, 'a.qcow2'), join(dir, 'b.qcow2')];
  const create = ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=256k'];
  await qemuImg([...create, a, '32P']);
  const r = await run(COMPAT_QEMU_IMG, [...create, b, '32P']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(await readFile(b), await readFile(a));
  for (const args of [['info'], ['info', '--output=json']]) {
    const theirs = (await run('qemu-img', [...args, a])).stdout;
    const ours = (await run(COMPAT_QEMU_IMG, [...args, a])).stdout;
    assert.equal(ours, theirs);
  }
  // 1 TiB of 512-byte L2 cache entries is more than qemu's cache can count (2^31 entries), and
  // the image is large enough to need all of them.
  const reopen = ['-c', 'reopen -o l2-cache-entry-size=512,l2-cache-size=1T', a];
  const theirs = await run('qemu-io', reopen);
  const ours = await run(COMPAT_QEMU_IO, reopen);
  assert.equal(ours.stderr.replace(/^[^:]*: /, ''), theirs.stderr.replace(/^[^:]*: /, ''));
  assert.equal(ours.code, theirs.code);
});

test('resizing past what the largest L1 table reaches fails in qemu-img words', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const f = join(dir, 't.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', f, '1G']);
  const theirs = await run('qemu-img', ['resize', f, '1E']);
  const ours = await run(COMPAT_QEMU_IMG, ['resize', f, '1E']);
  assert.deepEqual([ours.code, ours.stderr], [theirs.code, theirs.stderr]);
});

test('a header size past what qemu counts in L1 entries is "Image is too big", to open and to check', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const f = join(dir, 't.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', f, '4G']);
  // 1 EiB: 2^31 L1 entries of 512 MiB each, one more than qemu's int holds.
  const { open } = await import('node:fs/promises');
  const fh = await open(f, 'r+');
  const size = new Uint8Array(8);
  new DataView(size.buffer).setBigUint64(0, 1n << 60n);
  await fh.write(size, 0, 8, 24);
  await fh.close();
  for (const cmd of ['info', 'check']) {
    const theirs = await run('qemu-img', [cmd, f]);
    const ours = await run(COMPAT_QEMU_IMG, [cmd, f]);
    assert.deepEqual([ours.code, ours.stderr], [theirs.code, theirs.stderr], cmd);
  }
});
