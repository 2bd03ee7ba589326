/**
 * The native compare loop (ops/native-compare.ts, native/compare_loop.c): the addon's
 * compareExtents on its own (zero ranges against file ranges, several extents per side, reads past
 * a file's end, pieces of any size, arguments that do not cover the item), then compareImages on
 * files with the loop and with it taken away: the same verdicts for a backing chain, compressed
 * clusters (left to TypeScript) and differences in every layer, and the loop really ran.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { hostAddon } from '#src/host/native.node.js';
import { openImage } from '#src/node-open.js';
import { compareImages, type CompareResult } from '#src/ops/compare.js';
import { NativeCompare } from '#src/ops/native-compare.js';
import { needs, qemuImg, qemuIo, randomBytes, scratch } from '../support/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const addon = hostAddon();
const withLoop = addon?.compareExtents ? {} : { skip: 'the host addon is not loaded (QCOW_NO_NATIVE=1 or not built): no native compare loop' };

const triples = (...t: number[][]) => new Float64Array(t.flat());

test('compareExtents: the first differing byte of zero ranges, file ranges and bytes past a file\'s end', withLoop, async (t) => {
  const dir = await scratch(t);
  const data = randomBytes(3 * MiB, 31);
  data.fill(0, MiB, 2 * MiB);
  await writeFile(join(dir, 'x'), data);
  const fh = await open(join(dir, 'x'), 'r');
  t.after(() => fh.close());
  const fd = fh.fd;
  const compare = addon!.compareExtents!;
  for (const piece of [4096, 100_000, MiB]) {
    const [bufA, bufB] = [new Uint8Array(piece), new Uint8Array(piece)];
    // The file whole against itself in three extents: no difference.
    assert.equal(await compare(bufA, bufB, triples([fd, 0, 3 * MiB]), 1, triples([fd, 0, MiB], [-1, 0, MiB], [fd, 2 * MiB, MiB]), 3, 3 * MiB, piece), -1, `piece ${piece}`);
    // Zeros against data: the data's first non-zero byte.
    const nz = data.findIndex((b) => b !== 0);
    assert.equal(await compare(bufA, bufB, triples([-1, 0, 8192]), 1, triples([fd, 0, 8192]), 1, 8192, Math.min(piece, 8192)), nz);
    // Shifted by one byte: the first place where data[i] !== data[i + 1].
    let shift = 0;
    while (data[shift] === data[shift + 1]) shift++;
    assert.equal(await compare(bufA, bufB, triples([fd, 0, 2 * MiB]), 1, triples([fd, 1, 2 * MiB]), 1, 2 * MiB, piece), shift);
    // The zero middle against a zero range, then a byte of data: its offset in the item.
    assert.equal(await compare(bufA, bufB, triples([fd, MiB, MiB + 10]), 1, triples([-1, 0, MiB + 10]), 1, MiB + 10, piece), MiB + data.subarray(2 * MiB).findIndex((b) => b !== 0));
    // Past the file's end reads zeros: its last 4 KiB and 8 KiB beyond it against 4 KiB of the
    // file and 8 KiB of zeros.
    assert.equal(await compare(bufA, bufB, triples([fd, 3 * MiB - 4096, 12288]), 1, triples([fd, 3 * MiB - 4096, 4096], [-1, 0, 8192]), 2, 12288, Math.min(piece, 12288)), -1);
  }
  const buf = new Uint8Array(4096);
  assert.throws(() => compare(buf, buf, triples([fd, 0, 4096]), 1, triples([fd, 0, 100]), 1, 4096, 4096), RangeError, 'extents must cover the item');
  assert.throws(() => compare(buf, buf, triples([fd, 0, 8192]), 1, triples([fd, 0, 8192]), 1, 8192, 8192), RangeError, 'the piece must fit the buffers');
  await assert.rejects(compare(buf, buf, triples([9999, 0, 4096]), 1, triples([fd, 0, 4096]), 1, 4096, 4096), (e: { code?: string; fd?: number }) => e.code === 'EBADF' && e.fd === 9999);
});

/**
 * compareImages of two files, with the loop and with it taken away (NativeCompare.for answering
 * undefined, as without the addon); `calls`: the items the loop compared.
 */
async function bothWays(a: string, b: string, strict = false): Promise<{ native: CompareResult; script: CompareResult; calls: number }> {
  const real = NativeCompare.for.bind(NativeCompare);
  const out: CompareResult[] = [];
  let calls = 0;
  for (const loop of [true, false]) {
    NativeCompare.for = (x, y) => {
      const n = loop ? real(x, y) : undefined;
      if (!n) return undefined;
      const compare = n.compare.bind(n);
      n.compare = async (...args) => {
        const r = await compare(...args);
        if (r !== undefined) calls++;
        return r;
      };
      return n;
    };
    try {
      await using da = await openImage(a, { readOnly: true });
      await using db = await openImage(b, { readOnly: true });
      out.push(await compareImages(da, db, { strict }));
    } finally {
      NativeCompare.for = real;
    }
  }
  return { native: out[0]!, script: out[1]!, calls };
}

test('compareImages with and without the loop: a backing chain, compressed clusters, a difference in each layer', { ...withLoop, ...needs('qemu-img', 'qemu-io') }, async (t) => {
  const dir = await scratch(t);
  const p = (f: string) => join(dir, f);
  const data = randomBytes(8 * MiB, 32);
  data.fill(0, 6 * MiB, 7 * MiB);
  await writeFile(p('flat.raw'), data);
  // base.raw under top.qcow2, which holds 1-2 MiB itself; z.qcow2 the same bytes compressed.
  await writeFile(p('base.raw'), data);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', p('top.qcow2')]);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0x77 1M 1M', p('flat.raw')]);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0x77 1M 1M', p('base.raw')]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x77 1M 1M', p('top.qcow2')]);
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', p('flat.raw'), p('z.qcow2')]);

  const same = await bothWays(p('top.qcow2'), p('flat.raw'));
  assert.deepEqual(same.native, { identical: true, sizeMismatch: false });
  assert.deepEqual(same.script, same.native);
  assert.ok(same.calls > 0, 'the loop compared');

  // A byte changed in the backing file's part, then in the top layer's.
  for (const at of [5 * MiB + 12345, MiB + 100]) {
    const changed = new Uint8Array(data);
    changed.fill(0x77, MiB, 2 * MiB);
    changed[at] ^= 0xff;
    await writeFile(p('changed.raw'), changed);
    const r = await bothWays(p('top.qcow2'), p('changed.raw'));
    assert.deepEqual(r.native, { identical: false, sizeMismatch: false, offset: at - (at % 512), reason: 'content' }, `byte ${at}`);
    assert.deepEqual(r.script, r.native);
    assert.ok(r.calls > 0);
  }

  // Compressed clusters go the TypeScript way; the verdict is the same.
  const z = await bothWays(p('z.qcow2'), p('top.qcow2'));
  assert.deepEqual(z.native, { identical: true, sizeMismatch: false });
  assert.deepEqual(z.script, z.native);
  // Strict mode: the block status differs before any byte does.
  const s = await bothWays(p('top.qcow2'), p('flat.raw'), true);
  assert.deepEqual(s.native, s.script);
  assert.equal(s.native.identical, false);
});
