/**
 * Extended L2 entries (subclusters) both ways with QEMU's programs. The same sequence of writes,
 * partial-subcluster writes, zero writes with and without unmap, discards and compressed writes
 * runs once through QEMU's qemu-io and once through ours (compat/qemu-io), on images with and
 * without a backing file: each image then reads as a raw model of the sequence (through QEMU and
 * through us), `qemu-img check` is clean, and both programs map the two images alike (offsets,
 * allocation and zero status: the subcluster bitmaps came out the same).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { needs, qemuImg, qemuIo, run, runOk, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

/** Offsets in KiB: 64 KiB clusters of 32 subclusters of 2 KiB; the image is 2083 KiB (unaligned). */
const OPS = [
  'write -P 0x11 0 1k',
  'write -P 0x12 3k 512',
  'write -P 0x13 5k 1k',
  'write -P 0x14 62k 4k',
  'write -z 2k 2k',
  'write -P 0x21 64k 192k',
  'write -z 128k 64k',
  'write -z -u 192k 32k',
  'write -z -u 232k 24k',
  'write -z 65k 1k',
  'write -z 95k 8k',
  'write -z 319k 128k',
  'write -c -P 0x31 512k 64k',
  'write -c -P 0x32 576k 64k',
  'write -z 544k 64k',
  'write -c -P 0x33 640k 64k',
  'write -z -u 640k 64k',
  'write -P 0x41 768k 64k',
  'discard 768k 64k',
  'write -P 0x42 830k 3k',
  'discard 832k 64k',
  'write -z 2048k 35k',
  // An unaligned unmapping zero write over three compressed clusters: the head is written as data
  // (the first is decompressed), the middle one unmapped, the tail refused and written as zeros
  // into the clusters just given up.
  'write -c -P 0x61 1088k 64k',
  'write -c -P 0x62 1152k 64k',
  'write -c -P 0x63 1216k 64k',
  'write -z -u 1119k 129k',
  'write -z 1000k 1',
  'write -P 0x51 1001k 1',
];

async function sameContent(img: string, raw: string, via: string): Promise<void> {
  const r = await run(via, ['compare', '-f', 'qcow2', '-F', 'raw', img, raw]);
  assert.equal(r.code, 0, `${via} compare ${img}: ${r.stdout}${r.stderr}`);
}

async function mapOf(prog: string, img: string): Promise<unknown> {
  return JSON.parse((await runOk(prog, ['map', '--output=json', img])).stdout) as unknown;
}

for (const backing of [false, true]) {
  test(`extended L2 (${backing ? 'raw backing file' : 'no backing file'}): QEMU's and our writes, zero writes and discards agree both ways`, needs('qemu-img', 'qemu-io'), async (t) => {
    const dir = await scratch(t);
    const raw = join(dir, 'model.raw');
    const base = join(dir, 'base.raw');
    await qemuImg(['create', '-q', '-f', 'raw', raw, '2083k']);
    if (backing) {
      await qemuImg(['create', '-q', '-f', 'raw', base, '2083k']);
      await qemuIo(['-f', 'raw', '-c', 'write -P 0xff 0 2083k', base]);
      await qemuIo(['-f', 'raw', '-c', 'write -P 0xff 0 2083k', raw]);
    }
    const io = OPS.flatMap((op) => ['-c', op]);
    await qemuIo(['-f', 'raw', ...io.map((a) => a.replace('write -c', 'write').replace('write -z -u', 'write -z')), raw]);
    const images: Record<string, string> = {};
    for (const [who, prog] of [
      ['qemu', 'qemu-io'],
      ['qcow', COMPAT_QEMU_IO],
    ] as const) {
      const img = join(dir, `${who}.qcow2`);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', ...(backing ? ['-F', 'raw', '-b', base] : []), img, '2083k']);
      // One process per operation, as iotest 271 runs them: every open and close is exercised.
      for (const op of OPS) await runOk(prog, ['-f', 'qcow2', '-c', op, img]);
      images[who] = img;
    }
    for (const img of Object.values(images)) {
      // QEMU reads what the model holds, and so do we.
      await sameContent(img, raw, 'qemu-img');
      await sameContent(img, raw, COMPAT_QEMU_IMG);
      const check = await run('qemu-img', ['check', img]);
      assert.equal(check.code, 0, `qemu-img check ${img}: ${check.stdout}${check.stderr}`);
      const ours = await run(COMPAT_QEMU_IMG, ['check', img]);
      assert.equal(ours.code, 0, `our check ${img}: ${ours.stdout}${ours.stderr}`);
      // qemu-io reads a zeroed partial subcluster and its written neighbour back.
      await qemuIo(['-c', 'read -P 0 1000k 1', '-c', 'read -P 0x51 1001k 1', '-c', 'read -P 0x42 830k 2k', img]);
    }
    // The same operations left the same tables: same host offsets, same allocation and zero
    // status at every subcluster, whichever program maps them.
    assert.deepEqual(await mapOf('qemu-img', images.qcow!), await mapOf('qemu-img', images.qemu!));
    assert.deepEqual(await mapOf(COMPAT_QEMU_IMG, images.qemu!), await mapOf('qemu-img', images.qemu!));
    const ioMap = async (prog: string, img: string) => (await runOk(prog, ['-f', 'qcow2', '-c', 'map', img])).stdout;
    assert.equal(await ioMap(COMPAT_QEMU_IO, images.qemu!), await ioMap('qemu-io', images.qemu!));
  });
}

test('extended L2: a zero write over a compressed cluster and a copy-on-write after a snapshot match QEMU', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const ops = ['write -z 14k 2k', 'write -P 0xd0 26k 2k', 'write -P 0xe0 36k 2k', 'write -c -P 0x77 64k 64k'];
  const after = ['write -P 0xf0 30k 1k', 'write -z 40k 3k', 'write -z 26k 1k', 'write -z 96k 2k', 'write -z 12k 1k'];
  const maps: unknown[] = [];
  for (const [who, prog] of [
    ['qemu', 'qemu-io'],
    ['qcow', COMPAT_QEMU_IO],
  ] as const) {
    const img = join(dir, `${who}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', img, '1M']);
    for (const op of ops) await runOk(prog, ['-c', op, img]);
    await qemuImg(['snapshot', '-c', 'snap1', img]);
    for (const op of after) await runOk(prog, ['-c', op, img]);
    const check = await run('qemu-img', ['check', img]);
    assert.equal(check.code, 0, `qemu-img check ${img}: ${check.stdout}${check.stderr}`);
    await qemuIo(['-c', 'read -P 0xd0 27k 1k', '-c', 'read -P 0 26k 1k', '-c', 'read -P 0xf0 30k 1k', '-c', 'read -P 0 96k 2k', '-c', 'read -P 0x77 98k 30k', img]);
    maps.push(await mapOf('qemu-img', img));
  }
  assert.deepEqual(maps[1], maps[0]);
});

test('extended L2 with a raw external data file: zeroed subclusters are zeroed in the data file too', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  // The data file's name is relative: every program runs in the image's folder.
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,data_file=d.raw,data_file_raw=on', 'd.qcow2', '1M'], dir);
  await runOk(COMPAT_QEMU_IO, ['-c', 'write -P 0x55 0 128k', '-c', 'write -z 2k 4k', '-c', 'write -z -u 64k 64k', 'd.qcow2'], { cwd: dir });
  // The data file alone reads as the guest does.
  await qemuIo(['-f', 'raw', '-c', 'read -P 0x55 0 2k', '-c', 'read -P 0 2k 4k', '-c', 'read -P 0x55 6k 58k', '-c', 'read -P 0 64k 64k', 'd.raw'], dir);
  const r = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', 'd.qcow2', 'd.raw'], { cwd: dir });
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const check = await run('qemu-img', ['check', 'd.qcow2'], { cwd: dir });
  assert.equal(check.code, 0, check.stdout + check.stderr);
});
