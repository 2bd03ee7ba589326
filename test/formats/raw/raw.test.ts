import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { rawFormat } from '#src/formats/raw/raw.js';
import { QcowError } from '#src/core/errors.js';

test('a raw device reads and writes at any offset and length', async () => {
  const store = new MemoryStore(new Uint8Array(4096));
  const dev = await rawFormat.open(store);
  assert.equal(dev.size, 4096);
  await dev.write(3, new Uint8Array([1, 2, 3]));
  const buf = new Uint8Array(7);
  await dev.read(1, buf);
  assert.deepEqual([...buf], [0, 0, 1, 2, 3, 0, 0]);
  await dev.writeZeroes(4, 1);
  await dev.read(1, buf);
  assert.deepEqual([...buf], [0, 0, 1, 0, 3, 0, 0]);
});

test('requests past the end fail with QCOW_OUT_OF_RANGE and change nothing', async () => {
  const store = new MemoryStore(new Uint8Array(1024));
  const dev = await rawFormat.open(store);
  await assert.rejects(dev.write(1020, new Uint8Array(8).fill(9)), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_OUT_OF_RANGE');
  await assert.rejects(dev.read(-1, new Uint8Array(1)), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_INVALID_ARGUMENT');
  assert.equal(store.bytes().every((b) => b === 0), true);
});

test('a read-only raw device refuses writes', async () => {
  const dev = await rawFormat.open(new MemoryStore(new Uint8Array(512)), { readOnly: true });
  await assert.rejects(dev.write(0, new Uint8Array(1)), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_READ_ONLY');
});

test('create makes an empty raw image of the given size, and rejects a backing file', async () => {
  const store = new MemoryStore();
  await rawFormat.create(store, { size: 10000 });
  assert.equal(await store.size(), 10000);
  await assert.rejects(rawFormat.create(new MemoryStore(), { size: 1, backingFile: 'x' }), /backing/);
});

test('block status reports everything as data at its own offset', async () => {
  const dev = await rawFormat.open(new MemoryStore(new Uint8Array(8192)));
  assert.deepEqual(await dev.blockStatus(512, 1024), [{ offset: 512, length: 1024, allocated: true, zero: false, data: true, hostOffset: 512 }]);
});
