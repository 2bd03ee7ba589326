/**
 * Corruption events through the library (QEMU's qcow2_signal_corruption, see
 * formats/qcow2/corruption.ts): typed CorruptionEvents, the corrupt bit set where QEMU sets it, and
 * OpenOptions.onCorruption told each event QEMU would print, non-fatal ones that fail nothing
 * included. Images are broken by poking bytes into them; the interop test
 * test/compat/qemu-io/corrupt-clusters.interop.test.ts compares the same cases with QEMU's programs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CorruptionEvent, createImage, openImage, type BlockDevice } from '#src/node.js';
import { firstL2Offset, headerOf } from '../../support/qcow2-edit.js';
import { qcow } from '../../support/qemu.js';

const CS = 65536;

/** A 64 MiB image with its first `clusters` clusters written, then `edit` applied to its bytes. */
async function brokenImage(t: { after(fn: () => Promise<void>): void }, clusters: number, edit: (at: { l2: number; l1: number; reftable: number }) => Array<[number, bigint]>): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'qcow-corrupt-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'a.qcow2');
  await createImage(file, { format: 'qcow2', size: 64 << 20 });
  const dev = await openImage(file);
  await dev.write(0, new Uint8Array(clusters * CS).fill(7));
  await dev.close();
  const fh = await open(file, 'r+');
  try {
    const { header } = await headerOf(fh);
    const at = { l2: await firstL2Offset(fh), l1: header.l1TableOffset, reftable: header.refcountTableOffset };
    for (const [offset, value] of edit(at)) {
      const b = new Uint8Array(8);
      new DataView(b.buffer).setBigUint64(0, value);
      await fh.write(b, 0, 8, offset);
    }
  } finally {
    await fh.close();
  }
  return file;
}

/** The host offset the allocator gave guest cluster `i` (the image was written in order). */
async function hostOf(file: string, i: number): Promise<bigint> {
  const fh = await open(file, 'r');
  try {
    const b = new Uint8Array(8);
    await fh.read(b, 0, 8, (await firstL2Offset(fh)) + 8 * i);
    return new DataView(b.buffer).getBigUint64(0) & 0x00fffffffffffe00n;
  } finally {
    await fh.close();
  }
}

async function corruptBit(file: string): Promise<boolean> {
  const fh = await open(file, 'r');
  try {
    const { header } = await headerOf(fh);
    return (header.incompatibleFeatures & 2n) !== 0n;
  } finally {
    await fh.close();
  }
}

async function withDevice<T>(file: string, readOnly: boolean, told: CorruptionEvent[], fn: (dev: BlockDevice) => Promise<T>): Promise<T> {
  const dev = await openImage(file, { readOnly, onCorruption: (e) => told.push(e) });
  try {
    return await fn(dev);
  } finally {
    await dev.close().catch(() => undefined);
  }
}

test('a data cluster at an unaligned offset: a read marks the image corrupt with QEMU\'s words', async (t) => {
  const file = await brokenImage(t, 1, (at) => [[at.l2, 0x8000000000052a00n]]);
  const told: CorruptionEvent[] = [];
  await withDevice(file, false, told, async (dev) => {
    const e = await dev.read(0, new Uint8Array(CS)).then(() => undefined, (x: unknown) => x);
    assert.ok(e instanceof CorruptionEvent);
    assert.equal(e.message, 'Cluster allocation offset 0x52a00 unaligned (L2 offset: 0x40000, L2 index: 0)');
    assert.equal(e.fatal, true);
    assert.equal(e.markedCorrupt, true);
    assert.equal(e.told, true);
  });
  assert.deepEqual(told.map((e) => [e.fatal, e.message]), [[true, 'Cluster allocation offset 0x52a00 unaligned (L2 offset: 0x40000, L2 index: 0)']]);
  assert.equal(await corruptBit(file), true);
});

test('read-only, the event is non-fatal, told once, and the image is not changed', async (t) => {
  const file = await brokenImage(t, 2, (at) => [[at.l2 + 8, 0x8000000000062a00n]]);
  const told: CorruptionEvent[] = [];
  await withDevice(file, true, told, async (dev) => {
    for (let i = 0; i < 2; i++) {
      const e = await dev.read(CS, new Uint8Array(CS)).then(() => undefined, (x: unknown) => x);
      assert.ok(e instanceof CorruptionEvent);
      assert.equal(e.fatal, false);
      assert.equal(e.suppressed, i > 0);
    }
    // The rest of the image still reads.
    const data = new Uint8Array(CS);
    await dev.read(0, data);
    assert.equal(data[0], 7);
  });
  assert.equal(told.length, 1);
  assert.equal(told[0]!.message, 'Cluster allocation offset 0x62a00 unaligned (L2 offset: 0x40000, L2 index: 0x1)');
  assert.equal(await corruptBit(file), false);
});

test('a discard of a cluster at an unaligned offset leaks it with a non-fatal event; a later fatal one is still told', async (t) => {
  const file = await brokenImage(t, 2, (at) => [
    [at.l2, 0x8000000000052a00n],
    [at.l2 + 8, 0x8000000000062a00n],
  ]);
  const told: CorruptionEvent[] = [];
  await withDevice(file, false, told, async (dev) => {
    await dev.discard(0, CS);
    const e = await dev.read(CS, new Uint8Array(CS)).then(() => undefined, (x: unknown) => x);
    assert.ok(e instanceof CorruptionEvent);
  });
  assert.deepEqual(
    told.map((e) => [e.fatal, e.message]),
    [
      [false, 'Cannot free unaligned cluster 0x52a00'],
      [true, 'Cluster allocation offset 0x62a00 unaligned (L2 offset: 0x40000, L2 index: 0x1)'],
    ],
  );
  assert.equal(await corruptBit(file), true);
});

test('writes into unaligned clusters: a COPIED one is refused in QEMU\'s words, one the write covers whole is replaced', async (t) => {
  const zeroFile = await brokenImage(t, 1, (at) => [[at.l2, 0x8000000000002a01n]]);
  await withDevice(zeroFile, false, [], async (dev) => {
    await assert.rejects(dev.write(0, new Uint8Array(CS)), (e: unknown) => e instanceof CorruptionEvent && e.message === 'Preallocated zero cluster offset 0x2a00 unaligned (guest offset: 0)');
  });
  const dataFile = await brokenImage(t, 2, (at) => [[at.l2 + 8, 0x8000000000062a00n]]);
  await withDevice(dataFile, false, [], async (dev) => {
    await assert.rejects(dev.write(CS + 512, new Uint8Array(512)), (e: unknown) => e instanceof CorruptionEvent && e.message === 'Data cluster offset 0x62a00 unaligned (guest offset: 0x10200)');
  });
  // Not COPIED: a write of part of it would copy from it (refused), a whole one replaces it and
  // leaks it (a non-fatal event).
  const sharedFile = await brokenImage(t, 2, (at) => [[at.l2 + 8, 0x0000000000062a00n]]);
  const told: CorruptionEvent[] = [];
  await withDevice(sharedFile, false, told, async (dev) => {
    await dev.write(CS, new Uint8Array(CS).fill(9));
    const back = new Uint8Array(CS);
    await dev.read(CS, back);
    assert.equal(back[100], 9);
  });
  assert.deepEqual(told.map((e) => [e.fatal, e.message]), [[false, 'Cannot free unaligned cluster 0x62a00']]);
  assert.equal(await corruptBit(sharedFile), false);
});

test('a write after an in-place cluster takes the clusters right after it when they are free (as QEMU)', async (t) => {
  // Cluster 1's data is discarded, so the cluster right after cluster 0's is free again.
  const file = await brokenImage(t, 3, () => []);
  await withDevice(file, false, [], async (dev) => {
    await dev.discard(CS, CS);
    await dev.flush();
    await dev.write(0, new Uint8Array(2 * CS).fill(3));
  });
  assert.equal(await hostOf(file, 1), (await hostOf(file, 0)) + BigInt(CS));
});

test('amend to version 2 over an unaligned L2 table marks the image and fails with a typed error', async (t) => {
  const file = await brokenImage(t, 1, (at) => [[at.l1, 0x8000000000042a00n]]);
  const told: CorruptionEvent[] = [];
  await withDevice(file, false, told, async (dev) => {
    await assert.rejects(dev.amend!({ compat: '0.10' }), (e: unknown) => e instanceof Error && /^cannot expand zero clusters: L2 table offset 0x42a00 unaligned \(L1 index: 0\)$/.test(e.message));
  });
  assert.equal(told.length, 1);
  assert.equal(told[0]!.fatal, true);
  assert.equal(await corruptBit(file), true);
});

test('an image without a refcount table does not open', async (t) => {
  const file = await brokenImage(t, 1, () => []);
  const fh = await open(file, 'r+');
  await fh.write(new Uint8Array(4), 0, 4, 56);
  await fh.close();
  for (const readOnly of [true, false]) {
    await assert.rejects(openImage(file, { readOnly }), (e: unknown) => e instanceof Error && /no refcount table/.test(e.message));
  }
});

test('our CLI warns of a non-fatal event on an image open read-write, and the command goes on', async (t) => {
  const file = await brokenImage(t, 1, (at) => [[at.l2, 0x8000000000052a00n]]);
  const r = await qcow(['io', '-c', 'discard 0 64k', file]);
  assert.equal(r.code, 0);
  assert.match(r.stdout, /^discard 65536\/65536 bytes at offset 0$/m);
  assert.equal(r.stderr, 'qcow: warning: the image is corrupt: Cannot free unaligned cluster 0x52a00 (check -r all repairs it)\n');
  // Read-only, the failed request's error says it all (no warning beside it). (The discard above
  // emptied the entry: a new image.)
  const again = await brokenImage(t, 1, (at) => [[at.l2, 0x8000000000052a00n]]);
  const ro = await qcow(['convert', '-O', 'raw', again, join(again, '..', 'out.raw')]);
  assert.notEqual(ro.code, 0);
  assert.doesNotMatch(ro.stderr, /warning/);
  assert.match(ro.stderr, /Cluster allocation offset 0x52a00 unaligned \(L2 offset: 0x40000, L2 index: 0\)/);
});
