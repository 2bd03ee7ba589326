/**
 * Images made and written by us (CLI and library) read by qemu-img: the guest content qemu sees is
 * the content we meant, for plain, compressed, encrypted and overlay images, and for every
 * geometry QEMU accepts. Where qemu-img would make the same image, we make the same file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseOffset } from '#src/core/size.js';
import { FileStore } from '#src/storage/file.node.js';
import { openImage } from '#src/node.js';
import { deviceSha256, needs, qcow, qcowOk, qemuGuestSha256, qemuImg, qemuIo, randomBytes, scratch, sha256 } from '../../support/qemu.js';
import { writeEmptyImage } from '#src/formats/qcow1/create.js';
import { Qcow1Device } from '#src/formats/qcow1/device.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const aesOpts = (f: string, pw = 'hunter2') => ['--object', `secret,id=sec0,data=${pw}`, '--image-opts', `driver=qcow,file.filename=${f},encrypt.key-secret=sec0`];

/** Apply qemu-io `write [-c] -P PAT OFF LEN` commands to a model disk. */
function applyWrites(model: Uint8Array, cmds: string[]): Uint8Array {
  for (const c of cmds) {
    const m = /^write (?:-c )?-P (\S+) (\S+) (\S+)$/.exec(c);
    assert.ok(m, c);
    const off = parseOffset(m[2]!);
    model.fill(Number(m[1]), off, off + parseOffset(m[3]!));
  }
  return model;
}
const ioArgs = (cmds: string[]) => cmds.flatMap((c) => ['-c', c]);

// Boundaries of the default geometry: 4 KiB clusters, one L2 table maps 2 MiB.
const PLAIN_WRITES = [
  'write -P 0xab 128k 64k',
  'write -P 0x5a 3M 4k',
  'write -P 0x11 2093056 8192', // the last cluster of the first L2 table and the first of the second
  'write -P 0x12 4190208 4096', // the last cluster of the disk
  'write -P 0x13 4194303 1', // the last byte
  'write -P 0x14 100 10', // inside one sector
  'write -P 0x15 4000 200', // across a cluster boundary, sub-sector on both ends
];

test('images we make are read by qemu', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = randomBytes(4 * MiB, 5);
  src.fill(0xab, 0, 1 * MiB);
  src.fill(0, 2 * MiB, 3 * MiB);
  src.fill(0xcd, 2 * MiB, 2 * MiB + 64 * KiB);
  await writeFile(join(dir, 'src.raw'), src);
  await writeFile(join(dir, 'pw'), 'hunter2\n');
  await writeFile(join(dir, 'wrong'), 'hunter3\n');
  const srcSha = sha256(src);

  await t.test('qcow create + qcow io writes: the same file qemu-img + qemu-io make', async () => {
    await qcowOk(['create', '-q', '-f', 'qcow', 'ours.qcow', '4M'], { cwd: dir });
    await qcowOk(['io', ...ioArgs(PLAIN_WRITES), 'ours.qcow'], { cwd: dir });
    await qemuImg(['create', '-q', '-f', 'qcow', 'theirs.qcow', '4M'], dir);
    await qemuIo(['-f', 'qcow', ...ioArgs(PLAIN_WRITES), 'theirs.qcow'], dir);
    assert.equal(await qemuGuestSha256(['ours.qcow'], dir), sha256(applyWrites(new Uint8Array(4 * MiB), PLAIN_WRITES)));
    assert.deepEqual(await readFile(join(dir, 'ours.qcow')), await readFile(join(dir, 'theirs.qcow')), 'byte-identical files');
    await qcowOk(['compare', 'ours.qcow', 'theirs.qcow'], { cwd: dir });
  });

  await t.test('qcow convert -O qcow and -c: qemu reads the source content; -c exits 0 (qemu-img exits 1)', async () => {
    await qcowOk(['convert', '-O', 'qcow', 'src.raw', 'conv.qcow'], { cwd: dir });
    await qcowOk(['convert', '-c', '-O', 'qcow', 'src.raw', 'comp.qcow'], { cwd: dir });
    for (const f of ['conv.qcow', 'comp.qcow']) {
      await qemuImg(['compare', '-f', 'raw', '-F', 'qcow', 'src.raw', f], dir);
      assert.equal(await qemuGuestSha256(['-f', 'qcow', f], dir), srcSha, f);
    }
    const conv = (await readFile(join(dir, 'conv.qcow'))).length;
    const comp = (await readFile(join(dir, 'comp.qcow'))).length;
    assert.ok(comp < conv, `compressed ${comp} < plain ${conv}`);
    // The map qemu-img draws of our compressed image: compressed data has no offset, the random MiB does.
    const map = JSON.parse((await qemuImg(['map', '--output=json', 'comp.qcow'], dir)).stdout) as { start: number; data: boolean; offset?: number }[];
    assert.ok(map.some((e) => e.start === 0 && e.data && e.offset === undefined));
    assert.ok(map.some((e) => e.start === 3 * MiB && e.data && e.offset !== undefined));
  });

  await t.test('compressed writes with qcow io, including over normal and compressed clusters (qemu 7.2 gets these wrong)', async () => {
    await qcowOk(['create', '-q', '-f', 'qcow', 'cw.qcow', '1M'], { cwd: dir });
    const cmds = ['write -P 0x41 0 4k', 'write -c -P 0x42 0 4k', 'write -c -P 0x43 8k 4k', 'write -c -P 0x44 8k 4k', 'write -P 0x45 9k 1k', 'write -c -P 0x46 1020k 4k'];
    await qcowOk(['io', ...ioArgs(cmds), 'cw.qcow'], { cwd: dir });
    assert.equal(await qemuGuestSha256(['-f', 'qcow', 'cw.qcow'], dir), sha256(applyWrites(new Uint8Array(1 * MiB), cmds)));
    // and qemu-io sees the patterns
    await qemuIo(['-f', 'qcow', '-r', '-c', 'read -P 0x42 0 4k', '-c', 'read -P 0x44 8k 1k', '-c', 'read -P 0x45 9k 1k', '-c', 'read -P 0x46 1020k 4k', 'cw.qcow'], dir);
  });

  await t.test('overlays on a raw and on a qcow backing file', async () => {
    await qemuImg(['create', '-q', '-f', 'raw', 'base.raw', '2M'], dir);
    await qemuIo(['-f', 'raw', '-c', 'write -P 0x11 0 2M', 'base.raw'], dir);
    const cmds = ['write -P 0x22 128k 512', 'write -P 0x23 1M 64k', 'write -c -P 0x24 3M 512', 'write -P 0x25 1000 100', 'write -P 0x26 2097000 1000', 'write -P 0x27 4194303 1'];
    await qcowOk(['create', '-q', '-f', 'qcow', '-b', 'base.raw', '-F', 'raw', 'ov.qcow', '4M'], { cwd: dir });
    await qcowOk(['io', ...ioArgs(cmds), 'ov.qcow'], { cwd: dir });
    const model = new Uint8Array(4 * MiB).fill(0x11, 0, 2 * MiB);
    assert.equal(await qemuGuestSha256(['ov.qcow'], dir), sha256(applyWrites(model, cmds)));
    const info = JSON.parse((await qemuImg(['info', '--output=json', 'ov.qcow'], dir)).stdout) as Record<string, unknown>;
    assert.equal(info['backing-filename'], 'base.raw');
    assert.equal(info['cluster-size'], 512);

    // A qcow overlay on top of that one, its size taken from the backing file.
    await qcowOk(['create', '-q', '-f', 'qcow', '-b', 'ov.qcow', '-F', 'qcow', 'ov2.qcow'], { cwd: dir });
    const more = ['write -P 0x31 64k 4k', 'write -P 0x32 1M 512'];
    await qcowOk(['io', ...ioArgs(more), 'ov2.qcow'], { cwd: dir });
    assert.equal(await qemuGuestSha256(['ov2.qcow'], dir), sha256(applyWrites(model, more)));
  });

  await t.test('encrypted images: create, io and convert with --password-file; qemu decrypts them', async () => {
    await qcowOk(['create', '-q', '-f', 'qcow', '-o', 'encryption=on', '--password-file', 'pw', 'enc.qcow', '4M'], { cwd: dir });
    const cmds = ['write -P 0xab 128k 64k', 'write -P 0xcd 1536 1024', 'write -P 0x77 5000 3', 'write -P 0x78 2093056 8192'];
    await qcowOk(['io', '--password-file', 'pw', ...ioArgs(cmds), 'enc.qcow'], { cwd: dir });
    assert.equal(await qemuGuestSha256(aesOpts('enc.qcow'), dir), sha256(applyWrites(new Uint8Array(4 * MiB), cmds)));
    // the docs/notes/commands.md v1-aes content, made by us
    await qcowOk(['create', '-q', '-f', 'qcow', '-o', 'encrypt.format=aes', '--password-file', 'pw', 'v1-aes.qcow', '4M'], { cwd: dir });
    await qcowOk(['io', '--password-file', 'pw', '-c', 'write -P 0xab 128k 64k', '-c', 'write -P 0xcd 1536 1024', 'v1-aes.qcow'], { cwd: dir });
    assert.equal(await qemuGuestSha256(aesOpts('v1-aes.qcow'), dir), 'ff2e770fa9a5590a5e3aeb4c95f73b5300c2007f4b97ddd8c65fddae077406c5');

    await qcowOk(['convert', '-O', 'qcow', '-o', 'encrypt.format=aes', '--password-file', 'pw', 'src.raw', 'enc-conv.qcow'], { cwd: dir });
    assert.equal(await qemuGuestSha256(aesOpts('enc-conv.qcow'), dir), srcSha);
    const info = JSON.parse((await qemuImg(['info', '--output=json', 'enc-conv.qcow'], dir)).stdout) as Record<string, unknown>;
    assert.equal(info.encrypted, true);

    // Compression and encryption together are refused, as qemu-img refuses them.
    const r = await qcow(['convert', '-c', '-O', 'qcow', '-o', 'encryption=on', '--password-file', 'pw', 'src.raw', 'bad.qcow'], { cwd: dir });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /Compression and encryption not supported at the same time/);

    // A wrong password: qemu with the wrong secret and we with the wrong password see the same bytes.
    const ours = await openImage(join(dir, 'enc.qcow'), { readOnly: true, password: 'hunter3' });
    const oursSha = await deviceSha256(ours);
    await ours.close();
    assert.equal(oursSha, await qemuGuestSha256(aesOpts('enc.qcow', 'hunter3'), dir));
    const bad = await qcow(['io', '--password-file', 'wrong', '-c', 'read -P 0xab 128k 64k', 'enc.qcow'], { cwd: dir });
    assert.match(bad.stdout + bad.stderr, /Pattern verification failed/);
  });

  await t.test('an encrypted overlay on a raw backing file, written in pieces smaller than a sector', async () => {
    await qcowOk(['create', '-q', '-f', 'qcow', '-o', 'encryption=on', '--password-file', 'pw', '-b', 'base.raw', '-F', 'raw', 'encov.qcow', '4M'], { cwd: dir });
    const cmds = ['write -P 0x51 700 10', 'write -P 0x52 1M 100k', 'write -P 0x53 3M 512'];
    await qcowOk(['io', '--password-file', 'pw', ...ioArgs(cmds), 'encov.qcow'], { cwd: dir });
    const model = new Uint8Array(4 * MiB).fill(0x11, 0, 2 * MiB);
    assert.equal(await qemuGuestSha256(aesOpts('encov.qcow'), dir), sha256(applyWrites(model, cmds)));
  });

  await t.test('qemu-io writes into an image we made, and we read what it wrote', async () => {
    await qcowOk(['create', '-q', '-f', 'qcow', 'both.qcow', '4M'], { cwd: dir });
    await qcowOk(['io', '-c', 'write -P 1 0 64k', 'both.qcow'], { cwd: dir });
    await qemuIo(['-f', 'qcow', '-c', 'write -P 2 32k 64k', '-c', 'write -c -P 3 1M 4k', 'both.qcow'], dir);
    await qcowOk(['io', '-c', 'write -P 4 1M 512', 'both.qcow'], { cwd: dir });
    const dev = await openImage(join(dir, 'both.qcow'), { readOnly: true });
    const expect = applyWrites(new Uint8Array(4 * MiB), ['write -P 1 0 64k', 'write -P 2 32k 64k', 'write -P 3 1M 4k', 'write -P 4 1M 512']);
    assert.equal(await deviceSha256(dev), sha256(expect));
    await dev.close();
    assert.equal(await qemuGuestSha256(['both.qcow'], dir), sha256(expect));
  });

  await t.test('every geometry QEMU opens (cluster_bits 9..16, l2_bits 6..13), with compressed clusters', async () => {
    for (const [clusterBits, l2Bits] of [
      [9, 6],
      [9, 13],
      [16, 13],
      [16, 6],
      [13, 10],
    ] as const) {
      const name = `g${clusterBits}-${l2Bits}.qcow`;
      const size = 3 * MiB + 512;
      const store = await FileStore.open(join(dir, name), { create: true });
      await writeEmptyImage(store, { size, clusterBits, l2Bits });
      const dev = await Qcow1Device.open(store);
      const model = new Uint8Array(size);
      const put = async (off: number, data: Uint8Array) => {
        await dev.write(off, data);
        model.set(data, off);
      };
      await put(1000, randomBytes(300 * KiB, clusterBits));
      await put(size - 700, new Uint8Array(700).fill(9));
      await put(2 * MiB - 1, new Uint8Array([7, 7]));
      const cs = 2 ** clusterBits;
      const zipped = new Uint8Array(cs).fill(0x5e);
      await dev.writeCompressed(2 * MiB + cs, zipped);
      model.set(zipped, 2 * MiB + cs);
      await dev.close();
      assert.equal(await qemuGuestSha256(['-f', 'qcow', name], dir), sha256(model), name);
    }
  });
});
