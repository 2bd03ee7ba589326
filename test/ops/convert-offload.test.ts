/**
 * convert with copy offload (qemu-img -C): data stored as plain file bytes goes file to file with
 * copy_file_range, the rest is read and written; the result is the same guest content as qemu-img's,
 * and a pair of stores that cannot copy falls back to reading and writing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { BlockDevice } from '#src/core/block-device.js';
import { QcowError } from '#src/core/errors.js';
import { hostAddon } from '#src/host/native.node.js';
import { createImage, openImage } from '#src/node-open.js';
import type { ByteStore } from '#src/storage/types.js';
import { convert } from '#src/ops/convert.js';
import { needs, qcow, qemuGuestSha256, qemuImg, qemuIo, randomBytes, scratch, sha256 } from '../support/qemu.js';

const MiB = 2 ** 20;
const withAddon = hostAddon()?.copyFileRange ? {} : { skip: 'the host addon is not loaded (QCOW_NO_NATIVE=1 or not built): no copy_file_range' };

/** Count (and optionally refuse) the copy offloads a store is asked for. */
function spyCopies(store: ByteStore, refuse = 0): { calls: number; bytes: number } {
  const seen = { calls: 0, bytes: 0 };
  const copyTo = store.copyTo!.bind(store);
  Object.defineProperty(store, 'copyTo', {
    value: (target: ByteStore, from: number, to: number, length: number) => {
      seen.calls++;
      if (seen.calls <= refuse) return Promise.reject(new QcowError('QCOW_UNSUPPORTED', 'refused by the test'));
      seen.bytes += length;
      return copyTo(target, from, to, length);
    },
  });
  return seen;
}

async function rawFile(dir: string, name: string, data: Uint8Array): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, data);
  return path;
}

async function guestSha(dev: BlockDevice): Promise<string> {
  const all = new Uint8Array(dev.size);
  await dev.read(0, all);
  return sha256(all);
}

test('raw to raw: every data byte is copied by the kernel, none through our buffers', withAddon, async (t) => {
  const dir = await scratch(t);
  const data = randomBytes(5 * MiB + 4096, 7);
  const srcPath = await rawFile(dir, 'src.raw', data);
  const dstPath = join(dir, 'dst.raw');
  await createImage(dstPath, { format: 'raw', size: data.length });
  const src = await openImage(srcPath, { format: 'raw', readOnly: true });
  const dst = await openImage(dstPath, { format: 'raw' });
  const seen = spyCopies(src.store);
  const write = dst.write.bind(dst);
  let written = 0;
  dst.write = async (off, buf, o) => {
    written += buf.length;
    return write(off, buf, o);
  };
  await convert([src], dst, { copyOffload: true, targetIsZero: true, chunkSize: MiB });
  assert.equal(seen.bytes, data.length);
  assert.equal(written, 0);
  assert.equal(await guestSha(dst), sha256(data));
  await src.close();
  await dst.close();
});

test('stores that refuse to copy: the convert falls back to reading and writing, and the content is the same', withAddon, async (t) => {
  const dir = await scratch(t);
  const data = randomBytes(4 * MiB, 9);
  const srcPath = await rawFile(dir, 'src.raw', data);
  const dstPath = join(dir, 'dst.raw');
  await createImage(dstPath, { format: 'raw', size: data.length });
  const src = await openImage(srcPath, { format: 'raw', readOnly: true });
  const dst = await openImage(dstPath, { format: 'raw' });
  const seen = spyCopies(src.store, 1);
  await convert([src], dst, { copyOffload: true, targetIsZero: true, chunkSize: MiB, parallel: 1 });
  // The first copy was refused: offload is off from then on, as in qemu-img.
  assert.equal(seen.calls, 1);
  assert.equal(await guestSha(dst), sha256(data));
  await src.close();
  await dst.close();
});

test('a target in memory (no file to copy into) is written as usual', async (t) => {
  const dir = await scratch(t);
  const data = randomBytes(3 * MiB, 11);
  const src = await openImage(await rawFile(dir, 'src.raw', data), { format: 'raw', readOnly: true });
  const { memRaw } = await import('./devices.test-helpers.js');
  const dst = await memRaw(data.length);
  await convert([src], dst, { copyOffload: true, targetIsZero: true });
  assert.equal(await guestSha(dst), sha256(data));
  await src.close();
});

test('-C is refused with -c and with -S, in qemu-img\'s words', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const src = await rawFile(dir, 'src.raw', randomBytes(MiB, 3));
  for (const extra of [['-c', '-O', 'qcow2'], ['-S', '4k', '-O', 'raw']]) {
    const ours = await qcow(['convert', '-C', ...extra, '-f', 'raw', src, join(dir, 'ours.img')]);
    const theirs = await qemuImg(['convert', '-C', ...extra, '-f', 'raw', src, join(dir, 'theirs.img')]).catch((e: { stderr?: string }) => e);
    assert.notEqual(ours.code, 0);
    const line = ours.stderr.trim().replace(/^qcow: /, '');
    assert.match(String((theirs as { stderr?: string }).stderr ?? theirs), new RegExp(line.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
  }
});

test('qcow convert -C equals qemu-img convert -C: raw, a sparse raw, and a qcow2 overlay on a raw base', { ...needs('qemu-img', 'qemu-io'), ...withAddon }, async (t) => {
  const dir = await scratch(t);
  const base = await rawFile(dir, 'base.raw', randomBytes(8 * MiB, 5));
  const sparse = join(dir, 'sparse.raw');
  await qemuImg(['create', '-q', '-f', 'raw', sparse, '16M']);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0x5a 1M 192k', '-c', 'write -P 0x6b 9M 1M', sparse]);
  const overlay = join(dir, 'overlay.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x33 2M 300k', overlay]);
  for (const [name, fmt] of [[base, 'raw'], [sparse, 'raw'], [overlay, 'qcow2']] as const) {
    const ours = join(dir, 'ours.raw');
    const theirs = join(dir, 'theirs.raw');
    const r = await qcow(['convert', '-C', '-f', fmt, '-O', 'raw', name, ours]);
    assert.equal(r.code, 0, r.stderr);
    await qemuImg(['convert', '-C', '-f', fmt, '-O', 'raw', name, theirs]);
    assert.equal(await qemuGuestSha256(['-f', 'raw', ours]), await qemuGuestSha256(['-f', 'raw', theirs]), name);
    await qemuImg(['compare', '-f', fmt, '-F', 'raw', name, ours]);
  }
  // Holes of the sparse source stay holes: only its data (1.2 MiB) is copied.
  await qcow(['convert', '-C', '-f', 'raw', '-O', 'raw', sparse, join(dir, 'sparse-copy.raw')]);
  assert.ok((await stat(join(dir, 'sparse-copy.raw'))).blocks * 512 < 2 * MiB);
});

test('qcow2 sources and targets (small clusters, compressed, zero and cut-short clusters, 2 MiB clusters): the content qemu-img -C gives, check clean', { ...needs('qemu-img', 'qemu-io'), ...withAddon }, async (t) => {
  const dir = await scratch(t);
  // A source with 4 KiB clusters (runs that do not fill a 64 KiB target cluster), a compressed
  // cluster, zero clusters, and a last data cluster the file cuts short (it reads as zeros past EOF).
  const small = join(dir, 'small.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', small, '3M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 200k', '-c', 'write -P 0x22 260k 8k', '-c', 'write -z 512k 64k', '-c', 'write -c -P 0x33 1M 64k', '-c', 'write -P 0x44 3068k 4k', small]);
  const cut = join(dir, 'cut.qcow2');
  await qemuImg(['convert', '-f', 'qcow2', '-O', 'qcow2', small, cut]);
  const { truncate } = await import('node:fs/promises');
  await truncate(cut, (await stat(cut)).size - 1000);
  const big = join(dir, 'big.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', big, '9M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x55 0 5M', '-c', 'write -P 0x66 7M 1k', big]);
  for (const source of [small, cut, big]) {
    for (const fmt of ['raw', 'qcow2']) {
      const ours = join(dir, `ours.${fmt}`);
      const theirs = join(dir, `theirs.${fmt}`);
      const r = await qcow(['convert', '-C', '-f', 'qcow2', '-O', fmt, source, ours]);
      assert.equal(r.code, 0, r.stderr);
      await qemuImg(['convert', '-C', '-f', 'qcow2', '-O', fmt, source, theirs]);
      assert.equal(await qemuGuestSha256(['-f', fmt, ours]), await qemuGuestSha256(['-f', fmt, theirs]), `${source} -> ${fmt}`);
      if (fmt === 'qcow2') await qemuImg(['check', '-q', ours]);
    }
  }
});

test('raw to qcow2: the same layout as qemu-img -C, copied by the kernel, check clean', { ...needs('qemu-img'), ...withAddon }, async (t) => {
  const dir = await scratch(t);
  const data = randomBytes(6 * MiB + 65536, 21);
  const srcPath = await rawFile(dir, 'src.raw', data);
  const dstPath = join(dir, 'dst.qcow2');
  await createImage(dstPath, { format: 'qcow2', size: data.length });
  const src = await openImage(srcPath, { format: 'raw', readOnly: true });
  const dst = await openImage(dstPath, { format: 'qcow2' });
  const seen = spyCopies(src.store);
  await convert([src], dst, { copyOffload: true, targetIsZero: true });
  await src.close();
  await dst.close();
  assert.equal(seen.bytes, data.length);
  await qemuImg(['check', '-q', dstPath]);
  await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', srcPath, dstPath]);
  const theirs = join(dir, 'theirs.qcow2');
  await qemuImg(['convert', '-C', '-f', 'raw', '-O', 'qcow2', srcPath, theirs]);
  const map = async (p: string) => (await qemuImg(['map', '--output=json', p])).stdout;
  assert.equal(await map(dstPath), await map(theirs));
});

test('an encrypted target cannot take copied bytes: the convert reads, encrypts and writes them', { ...needs('qemu-img'), ...withAddon }, async (t) => {
  const dir = await scratch(t);
  const data = randomBytes(2 * MiB, 23);
  const srcPath = await rawFile(dir, 'src.raw', data);
  const dstPath = join(dir, 'dst.qcow2');
  await createImage(dstPath, { format: 'qcow2', size: data.length, options: { 'encrypt.format': 'luks' }, password: 'secret' });
  const src = await openImage(srcPath, { format: 'raw', readOnly: true });
  const dst = await openImage(dstPath, { format: 'qcow2', password: 'secret' });
  await convert([src], dst, { copyOffload: true, targetIsZero: true });
  assert.equal(await guestSha(dst), sha256(data));
  await src.close();
  await dst.close();
  await qemuImg(['check', '-q', '--object', 'secret,id=s0,data=secret', '--image-opts', `driver=qcow2,file.filename=${dstPath},encrypt.key-secret=s0`]);
});
