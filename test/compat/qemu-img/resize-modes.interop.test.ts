/**
 * qemu-img resize beyond plain qcow2 and raw: LUKS images (the luks format, and qcow2 with LUKS
 * encryption) grown and shrunk, and --preallocation=off|metadata|falloc|full on raw and qcow2,
 * each compared with the real qemu-img: its output and exit code, the file's size and blocks, and
 * the map of the result (without host offsets where QEMU places its metadata differently).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { holesWork } from '../../support/addon.js';
import { openImage } from '#src/node.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const SECRET = ['--object', 'secret,id=s0,data=abc'];
const LUKS = 'driver=luks,key-secret=s0,file.filename=x.img';
const QCOW2_LUKS = 'driver=qcow2,encrypt.key-secret=s0,file.filename=x.img';

interface Outcome {
  code: number;
  out: string;
  size: number;
  blocks: number;
  info: string;
  map: string;
}

/** Run each command in turn on a fresh copy of `original` (as x.img), with ours and with QEMU's. */
async function both(dir: string, original: string, steps: string[][], options: { format?: string; opts?: string; offsets?: boolean } = {}): Promise<[Outcome, Outcome]> {
  const results: Outcome[] = [];
  const file = join(dir, 'x.img');
  for (const prog of [COMPAT_QEMU_IMG, 'qemu-img']) {
    await copyFile(original, file);
    let out = '';
    let code = 0;
    for (const step of steps) {
      const r = await run(prog, step, { cwd: dir });
      out += r.stdout + r.stderr;
      code = code || r.code;
    }
    const st = await stat(file);
    const image = options.opts ? [...SECRET, '--image-opts', options.opts] : ['-f', options.format ?? 'raw', 'x.img'];
    const info = (await run('qemu-img', ['info', ...image], { cwd: dir })).stdout.replace(/^disk size: .*\n/m, '');
    let map = (await run('qemu-img', ['map', '--output=json', ...image], { cwd: dir })).stdout;
    if (!options.offsets) map = map.replace(/, "offset": \d+/g, '');
    // Without the host addon qcow cannot fallocate or punch (it writes zeros or nothing), so the
    // blocks a file occupies are compared only where holes work (test/support/addon.ts).
    results.push({ code, out, size: st.size, blocks: holesWork() ? st.blocks : 0, info, map });
  }
  return results as [Outcome, Outcome];
}

/**
 * The blocks two files occupy, to one file-system block. st_blocks also counts ext4's extent-tree
 * blocks, and how many extents delayed allocation makes depends on when writeback runs: under load
 * the same preallocated file took one 4 KiB index block more or less (5128 against 5120 sectors).
 * What is compared is the space the resize reserved or wrote, which differs by whole clusters.
 */
function assertSameBlocks(ours: number, theirs: number, what: string): void {
  const fsBlockSectors = 8;
  assert.ok(Math.abs(ours - theirs) <= fsBlockSectors, `${what}: blocks ${ours} against qemu-img's ${theirs}`);
}

test('LUKS images resize as in qemu-img: grow, shrink, relative sizes, preallocation, refusals', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const luks = join(dir, 'orig.luks');
  await qemuImg(['create', '-q', '-f', 'luks', ...SECRET, '-o', 'key-secret=s0,iter-time=10', luks, '4M']);
  await qemuIo([...SECRET, '--image-opts', `driver=luks,key-secret=s0,file.filename=${luks}`, '-c', 'write -q -P 0x5a 0 1M']);
  const r = (size: string, ...extra: string[]) => ['resize', ...SECRET, ...extra, '--image-opts', LUKS, size];
  const cases: string[][][] = [
    [r('8M')],
    [r('5000000'), r('+1000'), ['resize', ...SECRET, '--shrink', '--image-opts', LUKS, '--', '-1000']],
    [r('2M', '--shrink')],
    [r('2M')],
    [r('8M', '--preallocation=full')],
    [r('8M', '--preallocation=falloc')],
    [r('8M', '--preallocation=metadata')],
    [r('2M', '--preallocation=full', '--shrink')],
    [['resize', '-f', 'luks', 'x.img', '8M']],
  ];
  for (const steps of cases) {
    const [ours, theirs] = await both(dir, luks, steps, { opts: LUKS, offsets: true });
    assert.deepEqual(ours, theirs, steps.map((s) => s.join(' ')).join('; '));
  }
  // The data before the old end is still there.
  await copyFile(luks, join(dir, 'x.img'));
  await run(COMPAT_QEMU_IMG, r('16M'), { cwd: dir });
  assert.match((await qemuIo([...SECRET, '--image-opts', LUKS, '-c', 'read -P 0x5a 0 1M'], dir)).stdout, /read 1048576\/1048576/);
});

test('qcow2 with LUKS encryption resizes as in qemu-img, and needs its key to', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'orig.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', ...SECRET, '-o', 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', img, '4M']);
  await qemuIo([...SECRET, '--image-opts', `driver=qcow2,encrypt.key-secret=s0,file.filename=${img}`, '-c', 'write -q -P 0x5a 0 1M']);
  const r = (size: string, ...extra: string[]) => ['resize', ...SECRET, ...extra, '--image-opts', QCOW2_LUKS, size];
  for (const steps of [[r('8M')], [r('2M', '--shrink')], [r('2M')], [['resize', '-f', 'qcow2', 'x.img', '8M']]]) {
    const [ours, theirs] = await both(dir, img, steps, { opts: QCOW2_LUKS });
    assert.deepEqual({ ...ours, size: 0, blocks: 0 }, { ...theirs, size: 0, blocks: 0 }, steps.map((s) => s.join(' ')).join('; '));
  }
});

test('resize --preallocation on raw and qcow2 as qemu-img does it, refusals included', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const format of ['raw', 'qcow2']) {
    const orig = join(dir, `orig.${format}`);
    await qemuImg(['create', '-q', '-f', format, orig, '1M']);
    await qemuIo(['-f', format, '-c', 'write -q -P 9 0 64k', orig]);
    for (const mode of ['off', 'metadata', 'falloc', 'full']) {
      // Host offsets too: the new data sits where QEMU puts it (after a new refcount table).
      const [ours, theirs] = await both(dir, orig, [['resize', '-f', format, `--preallocation=${mode}`, 'x.img', '3M']], { format, offsets: true });
      const what = `${format} --preallocation=${mode}`;
      assert.equal(ours.out, theirs.out, what);
      assert.equal(ours.code, theirs.code, what);
      // falloc without the host addon reserves nothing: qemu-img's map then sees holes in ours.
      if (holesWork() || mode !== 'falloc') assert.equal(ours.map, theirs.map, what);
      assert.equal(ours.info, theirs.info, what);
      assert.equal(ours.size, theirs.size, `${what}: file size`);
      assertSameBlocks(ours.blocks, theirs.blocks, what);
      if (format === 'qcow2') assert.equal((await run('qemu-img', ['check', 'x.img'], { cwd: dir })).code, 0, `${what}: check`);
    }
    for (const steps of [
      [['resize', '-f', format, '--preallocation=full', '--shrink', 'x.img', '512k']],
      [['resize', '-f', format, '--preallocation=full', 'x.img', '1M']],
      [['resize', '-f', format, '--preallocation=bogus', 'x.img', '2M']],
      [['resize', '-f', format, 'x.img', '0']],
      [['resize', '-f', format, 'x.img', '3000001']],
    ]) {
      const [ours, theirs] = await both(dir, orig, steps, { format });
      assert.deepEqual({ ...ours, blocks: 0 }, { ...theirs, blocks: 0 }, `${format}: ${steps[0]!.join(' ')}`);
    }
  }
});

test('qcow2 resize --preallocation places the new clusters as qemu-img does, the partial cluster at the old end included', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], dir);
  await qemuIo(['-c', 'write -q -P 9 0 4M', 'base.qcow2'], dir);
  // [create options, old size, guest write, new size]: an old end inside a cluster, without and
  // with data there; an aligned one; a growth needing a new L2 table; a new end inside a cluster
  // (4 KiB clusters); one partial cluster both old and new end; a refcount block per 128 MiB
  // (refcount_bits=1); a backing image whose data reaches past the old end.
  const cases: [string[], string, string, string][] = [
    [[], '1000k', 'write -q -P 1 0 100k', '2M'],
    [[], '1000k', 'write -q -P 7 960k 40k', '2M'],
    [[], '1M', 'write -q -P 7 0 1M', '3M'],
    [[], '1000k', 'write -q -P 7 960k 40k', '700M'],
    [['-o', 'cluster_size=4k'], '1000k', 'write -q -P 7 960k 40k', '2047k'],
    [[], '1000k', 'write -q -P 7 960k 40k', '1010k'],
    [['-o', 'refcount_bits=1,cluster_size=4k'], '1000k', 'write -q -P 7 999k 1k', '300M'],
    [['-o', 'compat=0.10,cluster_size=512'], '1000k', 'write -q -P 7 999k 1k', '3000k'],
    [['-b', 'base.qcow2', '-F', 'qcow2'], '1000k', 'write -q -P 7 0 4k', '3M'],
  ];
  for (const [opts, oldSize, io, newSize] of cases) {
    const orig = join(dir, 'orig.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', ...opts, orig, oldSize]);
    await qemuIo(['-c', io, orig]);
    for (const mode of ['metadata', 'falloc', 'full']) {
      // metadata across an L2 table's reach: QEMU puts the new table between the data clusters
      // (a difference left, docs/compatibility.md).
      if (mode === 'metadata' && ['700M', '300M', '3000k'].includes(newSize)) continue;
      const what = `${opts.join(' ')} ${oldSize} (${io}) -> ${newSize} --preallocation=${mode}`;
      const [ours, theirs] = await both(dir, orig, [['resize', '-f', 'qcow2', `--preallocation=${mode}`, 'x.img', newSize]], { format: 'qcow2', offsets: true });
      // x.img is qemu-img's result now; ours again beside it, checked and compared.
      await copyFile(orig, join(dir, 'ours.qcow2'));
      assert.equal((await run(COMPAT_QEMU_IMG, ['resize', '-f', 'qcow2', `--preallocation=${mode}`, 'ours.qcow2', newSize], { cwd: dir })).code, 0, what);
      assert.equal((await run('qemu-img', ['check', 'ours.qcow2'], { cwd: dir })).code, 0, `${what}: check`);
      assert.equal((await run('qemu-img', ['compare', '-q', 'ours.qcow2', 'x.img'], { cwd: dir })).code, 0, `${what}: content`);
      if (holesWork() || mode !== 'falloc') assert.equal(ours.map, theirs.map, what);
      assert.equal(ours.size, theirs.size, `${what}: file size`);
      // 512-byte clusters: which 4 KiB file-system blocks get reserved differs by one.
      if (!opts.join().includes('cluster_size=512')) assertSameBlocks(ours.blocks, theirs.blocks, what);
      assert.equal(ours.info, theirs.info, what);
      assert.equal(ours.code, 0, `${what}: ${ours.out}`);
    }
  }
});

test('the library resizes a LUKS image without its key, keeping the payload where it was', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'l.luks');
  await qemuImg(['create', '-q', '-f', 'luks', ...SECRET, '-o', 'key-secret=s0,iter-time=10', file, '4M']);
  const before = (await stat(file)).size;
  const dev = await openImage(file, { inspectOnly: true });
  try {
    await dev.resize!(6 << 20);
    assert.equal(dev.size, 6 << 20);
    await assert.rejects(dev.resize!(1 << 20), { code: 'QCOW_INVALID_ARGUMENT' });
    await dev.resize!(1 << 20, { shrink: true });
  } finally {
    await dev.close();
  }
  assert.equal((await stat(file)).size, before - (3 << 20));
});

test('growing an overlay keeps its backing data in a partial last cluster, and zeros after (iotest 125)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'raw', 'b.base', '128k'], dir);
  await qemuIo(['-f', 'raw', '-c', 'write -q -P 1 0 128k', 'b.base'], dir);
  for (const prog of [COMPAT_QEMU_IMG, 'qemu-img']) {
    for (const mode of ['off', 'metadata', 'full']) {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', 'b.base', '-o', 'cluster_size=64k', 't.qcow2', '31k'], dir);
      assert.equal((await run(prog, ['resize', '-f', 'qcow2', `--preallocation=${mode}`, 't.qcow2', '96k'], { cwd: dir })).code, 0);
      const out = (await qemuIo(['-c', 'read -P 1 0 31k', '-c', 'read -P 0 31k 63k', 't.qcow2'], dir)).stdout;
      assert.doesNotMatch(out, /fail/, `${prog} --preallocation=${mode}`);
    }
  }
});
