/**
 * Refcount widths through compat/qemu-img and compat/qemu-io, side by side with QEMU's programs on
 * copies of one image (the behaviours of QEMU's iotest 112):
 *   - 64-bit counts past 2^53 are counts, not corruption: a write that copies a cluster whose count
 *     has the top bit set succeeds, and check prints 2^64 - 1 whole;
 *   - snapshot -c fails with QEMU's words when a count would pass its width, leaving the snapshot's
 *     L1 copy leaked, as qemu-img leaves it;
 *   - amend -o refcount_bits=N -p: the same passes over the refcounts drawn, the same bytes made.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

async function poke(file: string, offset: number, hex: string): Promise<void> {
  const fh = await open(file, 'r+');
  await fh.write(Buffer.from(hex, 'hex'), 0, hex.length / 2, offset);
  await fh.close();
}

/** Run `args` on `ours` with the compat program and on a copy with QEMU's; both outputs, file names replaced. */
async function sideBySide(dir: string, ours: string, program: 'qemu-img' | 'qemu-io', args: string[]) {
  const theirs = join(dir, `theirs-${Math.random().toString(36).slice(2)}.qcow2`);
  await copyFile(ours, theirs);
  const a = await run(program === 'qemu-img' ? COMPAT_QEMU_IMG : COMPAT_QEMU_IO, [...args, ours]);
  const b = await run(program, [...args, theirs]);
  const clean = (r: { code: number | null; stdout: string; stderr: string }, f: string) => ({
    code: r.code,
    out: (r.stdout + r.stderr).replaceAll(f, 'IMG').replace(/\d+ ops; [^\n]*/g, 'X ops'),
  });
  return { ours: clean(a, ours), theirs: clean(b, theirs), theirsFile: theirs };
}

/** An image of 64 MiB with `refcount_bits`, one 512-byte write at 0: data cluster 5 (0x50000), its L2 table at 0x40000. */
async function oneWrite(dir: string, bits: number): Promise<string> {
  const img = join(dir, `w${bits}.qcow2`);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits}`, img, '64M']);
  await qemuIo(['-c', 'write 0 512', img]);
  return img;
}

test('a write copying a cluster whose 64-bit count has its top bit set succeeds, as with qemu-io', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = await oneWrite(dir, 64);
  // Cluster 5's count becomes 2^63 and its L2 entry loses COPIED: a write must copy it first.
  await poke(img, 0x20028, '8000000000000000');
  await poke(img, 0x40000, '0000000000050000');
  const r = await sideBySide(dir, img, 'qemu-io', ['-c', 'write 0 512']);
  assert.deepEqual(r.ours, r.theirs);
  assert.match(r.ours.out, /wrote 512\/512 bytes/);
  assert.deepEqual(await readFile(img), await readFile(r.theirsFile), 'the same bytes, the count 2^63 - 1 included');
});

test('snapshot -c on a count at 2^64 - 1: QEMU\'s error, and check prints the count whole', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = await oneWrite(dir, 64);
  await poke(img, 0x20028, 'ffffffffffffffff');
  await poke(img, 0x40000, '0000000000050000');
  const r = await sideBySide(dir, img, 'qemu-img', ['snapshot', '-c', 'foo']);
  assert.deepEqual(r.ours, r.theirs);
  assert.match(r.ours.out, /Could not create snapshot 'foo': -22 \(Invalid argument\)/);
  const [ours, theirs] = [await run(COMPAT_QEMU_IMG, ['check', img]), await run('qemu-img', ['check', r.theirsFile])];
  assert.deepEqual({ code: ours.code, out: ours.stdout + ours.stderr }, { code: theirs.code, out: theirs.stdout + theirs.stderr });
  assert.match(ours.stderr + ours.stdout, /Leaked cluster 5 refcount=18446744073709551615 reference=1/);
});

test('snapshot -c past a narrow width fails with -22 and leaks the L1 copy, as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const bits of [1, 2]) {
    const img = await oneWrite(dir, bits);
    // refcount_bits=1 refuses the first snapshot, 2 the third.
    for (const name of bits === 1 ? [] : ['a', 'b']) await run(COMPAT_QEMU_IMG, ['snapshot', '-c', name, img]);
    const r = await sideBySide(dir, img, 'qemu-img', ['snapshot', '-c', 'over']);
    assert.deepEqual(r.ours, r.theirs, `refcount_bits=${bits}`);
    assert.match(r.ours.out, /Could not create snapshot 'over': -22 \(Invalid argument\)/);
    assert.deepEqual(await readFile(img), await readFile(r.theirsFile), `refcount_bits=${bits}: the same bytes`);
    const check = await run(COMPAT_QEMU_IMG, ['check', img]);
    assert.match(check.stdout + check.stderr, /^1 leaked clusters were found on the image\./m);
  }
});

test('amend -o refcount_bits -p: the passes qemu-img draws, the structures it makes', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  // The first needs a second allocating pass (the new table makes another block non-empty): the
  // percentage drops from 66.67 to 50.00 when the fourth pass is added, as in QEMU.
  const cases: Array<[string, string, string, number]> = [
    ['refcount_bits=1,cluster_size=512', '64k', `write 0 ${58 * 512}`, 64],
    ['refcount_bits=16', '64M', 'write 16M 32M', 1],
    ['refcount_bits=16,cluster_size=4096', '64M', 'write 0 20000000', 2],
    ['compat=0.10,cluster_size=512', '4M', 'write 0 3M', 4],
  ];
  for (const [create, size, io, bits] of cases) {
    const img = join(dir, 'amend.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', create, img, size]);
    await qemuIo(['-c', io, img]);
    const opts = create.startsWith('compat=0.10') ? `compat=1.1,refcount_bits=${bits}` : `refcount_bits=${bits}`;
    const r = await sideBySide(dir, img, 'qemu-img', ['amend', '-p', '-o', opts]);
    assert.deepEqual(r.ours, r.theirs, `${create} -> ${opts}`);
    if (bits === 64) assert.match(r.ours.out, /\(66\.67\/100%\)\r {4}\(50\.00\/100%\)/);
    // The structures land where qemu-img puts them (the header too, but for what the upgrade writes).
    if (!create.startsWith('compat=0.10')) assert.deepEqual(await readFile(img), await readFile(r.theirsFile), `${create} -> ${opts}: the same bytes`);
    assert.equal((await run('qemu-img', ['check', img])).code, 0);
  }
});

test('snapshot -c over an L2 entry naming a cluster no refcount table reaches: -27, or no block covers: -11, as qemu-img', needs('qemu-img', 'qemu-io'), async (t) => {
  // QEMU fails the first for the refcount table's size (EFBIG), the second with the EAGAIN of the
  // refcount block its update had to make (iotest 080).
  const dir = await scratch(t);
  for (const [entry, words] of [
    ['bfffffffffff0000', '-27 (File too large)'],
    ['800000ffffff0000', '-11 (Resource temporarily unavailable)'],
  ] as const) {
    const img = await oneWrite(dir, 16);
    await poke(img, 0x40000, entry);
    const r = await sideBySide(dir, img, 'qemu-img', ['snapshot', '-c', 'test']);
    assert.deepEqual(r.ours, r.theirs, entry);
    assert.match(r.ours.out, new RegExp(`Could not create snapshot 'test': ${words.replace(/[()]/g, '\\$&')}`));
  }
});
