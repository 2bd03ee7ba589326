/**
 * Write-behind (FileStore.writeBehind, the host addon's writeBehind): advice to the kernel that
 * must never change what a file holds or what reads see. Where the addon is not loaded the store
 * says so and writes as before.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, fdatasyncSync, openSync, writeSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { hostAddon } from '#src/host/native.node.js';
import { FileStore, WriteBehind } from '#src/storage/file.node.js';
import { randomBytes, scratch } from '../support/qemu.js';

const MiB = 2 ** 20;
const addon = hostAddon();
const withCall = addon?.writeBehind ? {} : { skip: 'the host addon (version 6 or later) is not loaded' };

test('with write-behind, large and small writes in any order land as without it', async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'wb.bin');
  const store = await FileStore.open(path, { create: true });
  // A window smaller than one write, of no round size: every large write drops an older one.
  assert.equal(store.writeBehind(3 * MiB + 512), !!addon?.writeBehind);
  const expected = new Uint8Array(40 * MiB);
  try {
    const writes: Promise<void>[] = [];
    let seed = 1;
    const put = (offset: number, length: number) => {
      const data = randomBytes(length, seed++);
      expected.set(data, offset);
      writes.push(store.write(offset, data));
    };
    for (let off = 0; off < 32 * MiB; off += 2 * MiB) put(off, 2 * MiB);
    put(33 * MiB, MiB); // a gap before it: the ranges to drop do not touch
    put(36 * MiB, 4 * MiB);
    await Promise.all(writes);
    // Small and unaligned, over a large write that may have left the page cache by now.
    put(5 * MiB + 100, 4096);
    await Promise.all(writes);
    // What reads see before the close, from the page cache or from the disk.
    const got = new Uint8Array(expected.length);
    await store.read(0, got);
    assert.ok(Buffer.from(got).equals(Buffer.from(expected)), 'read back before close');
    await store.flush();
  } finally {
    await store.close();
  }
  assert.ok((await readFile(path)).equals(Buffer.from(expected)), 'file content after close');
});

test('write-behind is not for a read-only store', async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'ro.bin');
  await writeFile(path, new Uint8Array(4096));
  const store = await FileStore.open(path, { readOnly: true });
  try {
    assert.equal(store.writeBehind(), false);
  } finally {
    await store.close();
  }
});

/** Bytes of `path` in the page cache, from util-linux's fincore; undefined when it cannot say. */
function cached(path: string): number | undefined {
  const r = spawnSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', path], { encoding: 'utf8' });
  return r.status === 0 ? Number(r.stdout.trim()) : undefined;
}

test('the addon call drops clean pages of the range it is given, and only those', withCall, async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'drop.bin');
  const fd = openSync(path, 'w+');
  try {
    writeSync(fd, randomBytes(8 * MiB), 0, 8 * MiB, 0);
    fdatasyncSync(fd);
    const before = cached(path);
    if (before === undefined || before === 0) return t.skip('fincore cannot see this file in the page cache (tmpfs, or no fincore)');
    // Length 0: no writeback asked (not "to the end of the file"); drop the first 4 MiB.
    await addon!.writeBehind!(fd, 0, 0, 0, 4 * MiB);
    const after = cached(path)!;
    assert.ok(after <= before - 4 * MiB, `${after} bytes cached after dropping 4 MiB of ${before}`);
    assert.ok(after >= 4 * MiB, `the other 4 MiB stay (${after})`);
    // Writeback of a range, then nothing to drop.
    await addon!.writeBehind!(fd, 0, 8 * MiB, 0, 0);
  } finally {
    closeSync(fd);
  }
});

test('the addon call rejects with the errno name on a bad descriptor', withCall, async () => {
  await assert.rejects(addon!.writeBehind!(-1, 0, MiB, 0, 0), (e: NodeJS.ErrnoException) => e.code === 'EBADF');
  assert.throws(() => addon!.writeBehind!(0, -1, 0, 0, 0), RangeError);
});

test('write-behind makes no calls until a window of large writes is done, then writes back what came before and drops what is a window behind', async () => {
  const calls: number[][] = [];
  const wb = new WriteBehind(async (...args) => void calls.push(args), 4 * MiB);
  // A small output (three writes, under the window): the kernel writes it back after we exit.
  for (let i = 0; i < 3; i++) wb.wrote(i * MiB, MiB);
  await Promise.resolve();
  assert.deepEqual(calls, []);
  // The fourth fills the window: the three before go to writeback in one call, then this one.
  wb.wrote(3 * MiB, MiB);
  // The fifth is one write past the window: the first MiB is dropped.
  wb.wrote(4 * MiB, MiB);
  // Out of order (a write elsewhere): the next two oldest are dropped, joined.
  wb.wrote(9 * MiB, 2 * MiB);
  // The calls run one after another, each when the one before has ended (settled() would drop
  // those still queued).
  await new Promise((resolve) => setImmediate(resolve));
  await wb.settled();
  assert.deepEqual(calls, [
    [0, 3 * MiB, 0, 0],
    [3 * MiB, MiB, 0, 0],
    [4 * MiB, MiB, 0, MiB],
    [9 * MiB, 2 * MiB, MiB, 2 * MiB],
  ]);
});
