import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs, { closeSync, fdatasyncSync, openSync } from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FileStore } from '#src/storage/file.node.js';
import { scratch } from '../support/qemu.js';
import { QcowError } from '#src/core/errors.js';
import { hostAddon } from '#src/host/native.node.js';

// Small requests take the synchronous path and large ones the thread pool (see file.node.ts); the
// two must be indistinguishable to a caller, whatever the threshold.
for (const syncMax of [0, 4096, 64 * 1024, Infinity]) {
  test(`reads and writes give the same bytes on either I/O path (syncMax ${syncMax})`, async (t) => {
    const dir = await scratch(t);
    const path = join(dir, 'f.bin');
    const content = new Uint8Array(300_000).map((_, i) => (i * 7 + 3) & 0xff);
    await writeFile(path, content);
    const store = await FileStore.open(path, { syncMax });
    try {
      for (const [offset, length] of [
        [0, 512],
        [4095, 4097],
        [100_000, 65536],
        [1, 200_000],
      ]) {
        const got = new Uint8Array(length);
        assert.equal(await store.read(offset, got), length);
        assert.deepEqual(got, content.subarray(offset, offset + length));
      }
      // Past the end: the bytes that exist, then zeros (and the count of real bytes).
      const tail = new Uint8Array(8192).fill(0xee);
      assert.equal(await store.read(content.length - 100, tail), 100);
      assert.deepEqual(tail.subarray(0, 100), content.subarray(content.length - 100));
      assert.ok(tail.subarray(100).every((b) => b === 0));
      const large = new Uint8Array(200_000).fill(0xee);
      assert.equal(await store.read(content.length - 10, large), 10);
      assert.ok(large.subarray(10).every((b) => b === 0));

      await store.write(10, new Uint8Array(100).fill(0xaa));
      await store.write(150_000, new Uint8Array(150_000).fill(0xbb));
      await store.flush();
    } finally {
      await store.close();
    }
    const after = await readFile(path);
    const expected = Uint8Array.from(content);
    expected.fill(0xaa, 10, 110);
    expected.fill(0xbb, 150_000, 300_000);
    assert.deepEqual(new Uint8Array(after), expected);
  });
}

test('a read-only store refuses writes on both paths, as a rejected promise', async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'ro.bin');
  await writeFile(path, new Uint8Array(4096));
  const store = await FileStore.open(path, { readOnly: true });
  try {
    for (const size of [512, 1 << 20]) {
      await assert.rejects(store.write(0, new Uint8Array(size)), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_READ_ONLY');
    }
  } finally {
    await store.close();
  }
});

test('under writeThrough every write, small or large, resolves only after its own flush (qemu-img -t writethrough)', async (t) => {
  const dir = await scratch(t);
  const store = await FileStore.open(join(dir, 'wt.bin'), { create: true });
  try {
    // Count the flushes and hold each one a moment, so a write that did not wait for its flush
    // would resolve while the flush is still pending.
    let started = 0;
    let finished = 0;
    const realFlush = store.flush.bind(store);
    store.flush = async () => {
      started++;
      await new Promise((resolve) => setTimeout(resolve, 5));
      await realFlush();
      finished++;
    };
    await store.write(0, new Uint8Array(512).fill(1));
    assert.equal(started, 0, 'no flush before writeThrough()');
    store.writeThrough();
    for (const [offset, size] of [[4096, 512], [1 << 20, 2 << 20]] as const) {
      const before = finished;
      await store.write(offset, new Uint8Array(size).fill(2));
      assert.equal(finished, before + 1, `the ${size}-byte write waited for one flush`);
    }
    assert.equal(started, 2);
    const back = new Uint8Array(2 << 20);
    await store.read(1 << 20, back);
    assert.ok(back.every((b) => b === 2));
  } finally {
    await store.close();
  }
});

/**
 * Counts fs.fdatasync and fs.close (the pooled calls file.node.ts imports) while `run` runs: the
 * builtin's ESM exports follow its CommonJS object after syncBuiltinESMExports.
 */
async function countPooledCalls(run: () => Promise<void>): Promise<{ fdatasync: number; close: number }> {
  const counts = { fdatasync: 0, close: 0 };
  const real = { fdatasync: fs.fdatasync, close: fs.close };
  fs.fdatasync = ((fd: number, cb: fs.NoParamCallback) => (counts.fdatasync++, real.fdatasync(fd, cb))) as typeof fs.fdatasync;
  fs.close = ((fd: number, cb?: fs.NoParamCallback) => (counts.close++, real.close(fd, cb))) as typeof fs.close;
  syncBuiltinESMExports();
  try {
    await run();
  } finally {
    Object.assign(fs, real);
    syncBuiltinESMExports();
  }
  return counts;
}

// QEMU flushes only when something was written since the last flush; qemu-io opens its image for
// writing, and a session that only read paid fdatasync twice and a pooled close (starting the
// I/O pool's threads) before this.
test('flush() calls fdatasync only after a change since the last flush, and an unchanged file closes inline', async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'f.bin');
  await writeFile(path, new Uint8Array(8192).fill(3));
  const untouched = await countPooledCalls(async () => {
    const store = await FileStore.open(path);
    await store.read(0, new Uint8Array(4096));
    await store.flush();
    await store.flush();
    await store.close();
  });
  assert.deepEqual(untouched, { fdatasync: 0, close: 0 });

  for (const size of [512, 2 << 20]) {
    const written = await countPooledCalls(async () => {
      const store = await FileStore.open(path);
      await store.write(0, new Uint8Array(size).fill(4));
      await store.flush();
      await store.flush(); // nothing new since the last one
      await store.truncate(size + 4096);
      await store.flush();
      await store.close();
    });
    assert.deepEqual(written, { fdatasync: 2, close: 1 }, `${size}-byte write`);
  }

  const created = await countPooledCalls(async () => {
    const store = await FileStore.open(join(dir, 'new.bin'), { create: true });
    await store.flush();
    await store.close();
  });
  assert.deepEqual(created, { fdatasync: 1, close: 1 }, 'a file truncated at its creation is a change');

  const readOnly = await countPooledCalls(async () => {
    const store = await FileStore.open(path, { readOnly: true });
    await store.flush();
    await store.close();
  });
  assert.deepEqual(readOnly, { fdatasync: 0, close: 0 });
});

test('a failing write is a QcowError naming the file, on either I/O path (/dev/full: ENOSPC)', { skip: process.platform !== 'linux' }, async () => {
  const store = await FileStore.open('/dev/full', { noLock: true });
  try {
    for (const size of [512, 1 << 20]) {
      await assert.rejects(store.write(0, new Uint8Array(size)), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_IO' && e.file === '/dev/full');
    }
    await assert.rejects(store.truncate(0), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_IO');
  } finally {
    await store.close();
  }
});

test('large writes issued together all land, each where it was aimed, and report in issue order', async (t) => {
  // Writes of 1 MiB and more run one after another per file (see file.node.ts); smaller ones at once.
  const dir = await scratch(t);
  const path = join(dir, 'w.bin');
  const store = await FileStore.open(path, { create: true, syncMax: 0 });
  const MiB = 1 << 20;
  const finished: number[] = [];
  try {
    const writes = [];
    for (let i = 0; i < 8; i++) {
      const size = i % 2 === 0 ? 2 * MiB : 256 * 1024;
      writes.push(store.write(i * 2 * MiB, new Uint8Array(size).fill(i + 1)).then(() => finished.push(i)));
    }
    await Promise.all(writes);
  } finally {
    await store.close();
  }
  const serial = finished.filter((i) => i % 2 === 0);
  assert.deepEqual(serial, [0, 2, 4, 6]);
  const after = new Uint8Array(await readFile(path));
  for (let i = 0; i < 8; i++) {
    const size = i % 2 === 0 ? 2 * MiB : 256 * 1024;
    const got = after.subarray(i * 2 * MiB, i * 2 * MiB + size);
    assert.ok(got.every((b) => b === i + 1), `write ${i}`);
  }
});

test('a failed large write does not hold up the ones queued behind it', { skip: process.platform !== 'linux' }, async () => {
  const store = await FileStore.open('/dev/full', { noLock: true, syncMax: 0 });
  try {
    const results = await Promise.allSettled([1, 2, 3].map(() => store.write(0, new Uint8Array(1 << 20))));
    assert.deepEqual(
      results.map((r) => r.status),
      ['rejected', 'rejected', 'rejected'],
    );
  } finally {
    await store.close();
  }
});

// cachedReadsInline (qcow serve): a large read takes what the page cache holds at once and the
// rest from the pool. Whatever part is cached, the bytes and the count must be those of a plain read.
test('inline cached reads give the same bytes whether the range is cached, partly cached or not at all', { skip: !hostAddon()?.preadNoWait || !hostAddon()?.writeBehind }, async (t) => {
  const addon = hostAddon()!;
  const dir = await scratch(t);
  const path = join(dir, 'cached.bin');
  const size = 4 << 20;
  const content = new Uint8Array(size).map((_, i) => (i * 13 + (i >> 12)) & 0xff);
  await writeFile(path, content);
  const fd = openSync(path, 'r');
  // Written back and then given back to the kernel (fadvise DONTNEED): the kernel may keep some
  // pages (and read-ahead brings others back), so which path serves each part varies; the bytes
  // must not.
  const dropCache = async () => {
    fdatasyncSync(fd);
    await addon.writeBehind!(fd, 0, 0, 0, size);
  };
  const store = await FileStore.open(path, { readOnly: true, cachedReadsInline: true });
  try {
    const check = async (offset: number, length: number) => {
      const got = new Uint8Array(length).fill(0xee);
      const real = Math.max(0, Math.min(length, size - offset));
      assert.equal(await store.read(offset, got), real);
      assert.deepEqual(got.subarray(0, real), content.subarray(offset, offset + real));
      assert.ok(got.subarray(real).every((b) => b === 0));
    };
    await check(0, size); // cached: the file was just written
    await dropCache();
    await check(1 << 20, 1 << 20);
    await dropCache();
    await check(0, 256 << 10);
    await check(0, 1 << 20); // starts in what the last read cached
    await check(size - 100_000, 300_000); // past the end of the file: zeros
  } finally {
    await store.close();
    closeSync(fd);
  }
});
