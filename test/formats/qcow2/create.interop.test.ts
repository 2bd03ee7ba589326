/** qcow2 create with an external data file, against qemu-img create: what each file looks like. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qcowOk, qemuImg, randomBytes, scratch } from '../../support/qemu.js';
import { hostAddon } from '#src/host/native.node.js';

const MiB = 2 ** 20;

test('an external data file grows to the virtual size in every preallocation mode, as with qemu-img', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  for (const mode of ['off', 'metadata', 'falloc', 'full']) {
    const sizes: number[][] = [];
    for (const [who, make] of [
      ['qemu', (img: string, o: string) => qemuImg(['create', '-q', '-f', 'qcow2', '-o', o, img, '16M'])],
      ['qcow', (img: string, o: string) => qcowOk(['create', '-q', '-f', 'qcow2', '-o', o, img, '16M'])],
    ] as const) {
      const img = join(dir, `${who}-${mode}.qcow2`);
      await make(img, `data_file=${img}.data,preallocation=${mode}`);
      const data = await stat(`${img}.data`);
      // Sizes exactly; disk use only as low or high (file systems round differently), and only
      // with the host addon: without it falloc has no fallocate and writes nothing (the fallback).
      const high = data.blocks * 512 >= 16 * MiB ? 1 : 0;
      sizes.push([data.size, mode === 'falloc' && !hostAddon() ? -1 : high]);
      await qemuImg(['check', '-q', img]);
    }
    if (sizes[1]![1] === -1) sizes[0]![1] = -1;
    assert.deepEqual(sizes[1], sizes[0], `preallocation=${mode}`);
    assert.equal(sizes[0]![0], 16 * MiB);
  }
});

test('a size that is not whole sectors is rounded up as qemu-img does, so QEMU sees every byte of a converted raw', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const headerSize = async (img: string) => {
    const { stdout } = await qemuImg(['info', '--output=json', img]);
    return (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
  };
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'q.qcow2'), '1000000']);
  await qcowOk(['create', '-q', '-f', 'qcow2', join(dir, 'o.qcow2'), '1000000']);
  assert.equal(await headerSize(join(dir, 'o.qcow2')), await headerSize(join(dir, 'q.qcow2')));
  assert.equal(await headerSize(join(dir, 'o.qcow2')), 1000448);

  // A raw file of 1000000 bytes: its last 64 bytes lie past the last whole sector.
  const raw = randomBytes(1000000, 9);
  await writeFile(join(dir, 'odd.raw'), raw);
  await qcowOk(['convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'odd.raw'), join(dir, 'odd.qcow2')]);
  await qemuImg(['check', '-q', join(dir, 'odd.qcow2')]);
  await qemuImg(['convert', '-O', 'raw', join(dir, 'odd.qcow2'), join(dir, 'back.raw')]);
  const back = await readFile(join(dir, 'back.raw'));
  assert.equal(back.length, 1000448);
  assert.ok(Buffer.from(raw).equals(back.subarray(0, raw.length)), 'QEMU reads every byte of the raw file');
  assert.ok(back.subarray(raw.length).every((b) => b === 0), 'and zeros after it');
});
