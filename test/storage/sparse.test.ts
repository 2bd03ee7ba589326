/**
 * Holes and fallocate through the host addon: a sparse raw file reports its holes as zeros (so
 * map, measure and compare -s equal qemu-img's), discard gives host blocks back for raw and for
 * qcow2 clusters whose refcount drops to zero, zero writes punch or zero ranges in place, and
 * preallocation=falloc reserves blocks. Without the addon (QCOW_NO_NATIVE=1, npm run
 * test:fallback) the same images keep working with every byte counted as data.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { hostAddon } from '#src/host/native.node.js';
import { FileStore } from '#src/storage/file.node.js';
import { needs, qcow, qcowOk, qemuGuestSha256, qemuImg, qemuIo, run, scratch } from '../support/qemu.js';

const withAddon = hostAddon() ? {} : { skip: 'the host addon is not loaded (QCOW_NO_NATIVE=1 or not built): holes are not visible' };
const MiB = 2 ** 20;

/** Bytes the file occupies on disk. */
const used = async (path: string) => (await stat(path)).blocks * 512;

/** A 4 MiB raw file with data at 1 MiB (64 KiB) and 3 MiB (128 KiB), holes elsewhere. */
async function sparseRaw(dir: string, name = 'sparse.raw'): Promise<string> {
  const path = join(dir, name);
  await qemuImg(['create', '-q', '-f', 'raw', path, '4M']);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0x11 1M 64k', '-c', 'write -P 0x22 3M 128k', path]);
  return path;
}

test('a sparse raw file: map, measure and compare -s equal qemu-img', { ...needs('qemu-img', 'qemu-io'), ...withAddon }, async (t) => {
  const dir = await scratch(t);
  const a = await sparseRaw(dir);
  for (const args of [
    ['map', '--output=json', '-f', 'raw', a],
    ['map', '-f', 'raw', a],
    ['measure', '-O', 'qcow2', '-f', 'raw', a],
    ['measure', '--output=json', '-O', 'qcow2', '-f', 'raw', a],
  ]) {
    const ours = await qcowOk(args);
    const theirs = await qemuImg(args);
    assert.equal(ours.stdout, theirs.stdout, args.join(' '));
  }
  // A copy whose data was written as zeros (allocated zeros, not holes): equal content, different
  // allocation, which compare -s reports as qemu-img does.
  const b = join(dir, 'allocated.raw');
  await qemuImg(['convert', '-S', '0', '-f', 'raw', '-O', 'raw', a, b]);
  for (const strict of [[], ['-s']]) {
    const ours = await qcow(['compare', ...strict, '-f', 'raw', '-F', 'raw', a, b]);
    const theirs = await run('qemu-img', ['compare', ...strict, '-f', 'raw', '-F', 'raw', a, b]);
    assert.deepEqual([ours.code, ours.stdout], [theirs.code, theirs.stdout], `compare ${strict.join(' ')}`);
  }
  // convert leaves the holes out of a qcow2 target: it maps the same data as the source.
  const q = join(dir, 'from-sparse.qcow2');
  await qcowOk(['convert', '-f', 'raw', '-O', 'qcow2', a, q]);
  const mapped = JSON.parse((await qemuImg(['map', '--output=json', q])).stdout) as { data: boolean; length: number }[];
  assert.equal(mapped.filter((e) => e.data).reduce((s, e) => s + e.length, 0), 192 * 1024);
});

test('raw: discard and zero writes with unmap give blocks back; zero writes without unmap keep them', { ...needs('qemu-img', 'qemu-io'), ...withAddon }, async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'disk.raw');
  await qemuImg(['create', '-q', '-f', 'raw', '-o', 'preallocation=full', path, '4M']);
  assert.ok((await used(path)) >= 4 * MiB);
  await qcowOk(['io', '-f', 'raw', '-c', 'discard 0 1M', '-c', 'write -z -u 1M 1M', '-c', 'write -z 2M 1M', path]);
  // 2 MiB punched; the zeroed MiB stays allocated, as FALLOC_FL_ZERO_RANGE keeps it.
  const after = await used(path);
  assert.ok(after <= 2 * MiB + 64 * 1024 && after >= 2 * MiB - 64 * 1024, `${after} bytes in use`);
  assert.equal(await qemuGuestSha256(['-f', 'raw', path]), await qemuGuestSha256(['-f', 'raw', await zerosRaw(dir)]));
  // Zeroed ranges are unwritten extents, which SEEK_DATA skips like holes: qemu-img maps them alike.
  assert.equal((await qcowOk(['map', '--output=json', '-f', 'raw', path])).stdout, (await qemuImg(['map', '--output=json', '-f', 'raw', path])).stdout);
});

async function zerosRaw(dir: string): Promise<string> {
  const p = join(dir, 'zeros.raw');
  await writeFile(p, new Uint8Array(4 * MiB));
  return p;
}

test('qcow2: clusters freed by discard are punched out of the file; qemu-img check stays clean', { ...needs('qemu-img', 'qemu-io'), ...withAddon }, async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', path, '16M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x33 0 8M', path]);
  const before = await used(path);
  await qcowOk(['io', '-f', 'qcow2', '-c', 'discard 0 6M', path]);
  const after = await used(path);
  assert.ok(before - after >= 6 * MiB - 64 * 1024, `in use ${before} -> ${after}`);
  // The file keeps its length (the holes are inside it) and QEMU finds the image consistent.
  await qemuImg(['check', path]);
  await qemuIo(['-f', 'qcow2', '-c', 'read -P 0 0 6M', '-c', 'read -P 0x33 6M 2M', path]);
  // The freed clusters are reused by the next writes, which read back.
  await qcowOk(['io', '-f', 'qcow2', '-c', 'write -P 0x44 8M 4M', path]);
  await qemuImg(['check', path]);
  await qemuIo(['-f', 'qcow2', '-c', 'read -P 0x44 8M 4M', '-c', 'read -P 0x33 6M 2M', path]);
});

for (const format of ['raw', 'qcow2']) {
  test(`preallocation=falloc reserves the blocks of a ${format} image, as qemu-img`, { ...needs('qemu-img'), ...withAddon }, async (t) => {
    const dir = await scratch(t);
    const ours = join(dir, `ours.${format}`);
    const theirs = join(dir, `theirs.${format}`);
    await qcowOk(['create', '-q', '-f', format, '-o', 'preallocation=falloc', ours, '8M']);
    await qemuImg(['create', '-q', '-f', format, '-o', 'preallocation=falloc', theirs, '8M']);
    assert.equal((await stat(ours)).size, (await stat(theirs)).size);
    // Metadata clusters may occupy a block more or less (qemu writes some of them whole).
    assert.ok(Math.abs((await used(ours)) - (await used(theirs))) <= 128 * 1024, `${await used(ours)} against ${await used(theirs)} bytes in use`);
    assert.ok((await used(ours)) >= 8 * MiB);
    if (format === 'qcow2') await qemuImg(['check', ours]);
  });
}

test('FileStore offers the sparse calls only with the addon, and only what its mode allows', async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'f.raw');
  await writeFile(path, new Uint8Array(4096));
  const ro = await FileStore.open(path, { readOnly: true });
  const rw = await FileStore.open(join(dir, 'g.raw'), { readOnly: false, create: true });
  try {
    assert.equal(ro.punchHole, undefined, 'read-only stores never punch');
    assert.equal(typeof ro.dataRuns, hostAddon() ? 'function' : 'undefined');
    assert.equal(typeof rw.punchHole, hostAddon() ? 'function' : 'undefined');
    if (ro.dataRuns) assert.deepEqual(await ro.dataRuns(0, 8192), [{ offset: 0, length: 4096, data: true }, { offset: 4096, length: 4096, data: false }]);
  } finally {
    await ro.close();
    await rw.close();
  }
});

// dataRuns keeps the last run of data it found (a server asks before every read); the store's own
// calls that make holes must drop it, and a range reaching past it must be asked again.
test('dataRuns answers from the last run of data it found, until this store punches, zeroes or truncates', withAddon, async (t) => {
  const dir = await scratch(t);
  const store = await FileStore.open(join(dir, 'runs.raw'), { readOnly: false, create: true });
  try {
    await store.write(0, new Uint8Array(MiB).fill(1));
    const runs = (offset: number, length: number) => store.dataRuns!(offset, length);
    assert.deepEqual(await runs(0, 4096), [{ offset: 0, length: 4096, data: true }]);
    assert.deepEqual(await runs(512 * 1024, 256 * 1024), [{ offset: 512 * 1024, length: 256 * 1024, data: true }]);
    await store.punchHole!(256 * 1024, 256 * 1024);
    assert.deepEqual(await runs(0, MiB), [
      { offset: 0, length: 256 * 1024, data: true },
      { offset: 256 * 1024, length: 256 * 1024, data: false },
      { offset: 512 * 1024, length: 512 * 1024, data: true },
    ]);
    assert.deepEqual(await runs(512 * 1024, 4096), [{ offset: 512 * 1024, length: 4096, data: true }]);
    await store.zeroRange!(768 * 1024, 256 * 1024);
    // ZERO_RANGE may keep the blocks (then still data) or free them: nothing to check but that
    // the runs still cover the range.
    const after = await runs(512 * 1024, 512 * 1024);
    assert.equal(after.reduce((n, r) => n + r.length, 0), 512 * 1024);
    await store.truncate(640 * 1024);
    assert.deepEqual(await runs(512 * 1024, 256 * 1024), [
      { offset: 512 * 1024, length: 128 * 1024, data: true },
      { offset: 640 * 1024, length: 128 * 1024, data: false },
    ]);
    // Data written past a run's end: asked again, not taken from the run.
    await store.write(MiB, new Uint8Array(4096).fill(2));
    assert.deepEqual(await runs(512 * 1024, 4096), [{ offset: 512 * 1024, length: 4096, data: true }]);
    assert.deepEqual(await runs(MiB, 4096), [{ offset: MiB, length: 4096, data: true }]);
  } finally {
    await store.close();
  }
});
