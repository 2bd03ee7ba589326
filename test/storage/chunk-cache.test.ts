import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ChunkCache } from '#src/storage/chunk-cache.js';

const chunk = (n: number, fill: number) => new Uint8Array(n).fill(fill);

test('a cached chunk is not loaded again', async () => {
  const cache = new ChunkCache(100);
  let loads = 0;
  const load = async (i: number) => (loads++, chunk(10, i));
  assert.deepEqual(await cache.get(3, load), chunk(10, 3));
  assert.deepEqual(await cache.get(3, load), chunk(10, 3));
  assert.equal(loads, 1);
});

test('concurrent gets of one chunk share one load', async () => {
  const cache = new ChunkCache(100);
  let loads = 0;
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const load = async (i: number) => {
    loads++;
    await gate;
    return chunk(10, i);
  };
  const all = Promise.all([cache.get(1, load), cache.get(1, load), cache.get(1, load)]);
  release();
  assert.equal((await all).length, 3);
  assert.equal(loads, 1);
});

test('a failed load is not remembered: the next get tries again', async () => {
  const cache = new ChunkCache(100);
  let loads = 0;
  const load = async () => {
    if (++loads === 1) throw new Error('flaky');
    return chunk(10, 1);
  };
  await assert.rejects(cache.get(0, load), /flaky/);
  assert.deepEqual(await cache.get(0, load), chunk(10, 1));
});

test('the least recently used chunk goes first when the budget is exceeded', async () => {
  const cache = new ChunkCache(30);
  const load = async (i: number) => chunk(10, i);
  for (const i of [0, 1, 2]) await cache.get(i, load);
  await cache.get(0, load); // 0 is now the most recent
  await cache.get(3, load); // evicts 1
  assert.deepEqual([0, 1, 2, 3].map((i) => cache.has(i)), [true, false, true, true]);
  assert.equal(cache.heldBytes, 30);
});

test('a chunk bigger than the whole budget is served but not kept', async () => {
  const cache = new ChunkCache(5);
  assert.equal((await cache.get(0, async () => chunk(10, 1))).length, 10);
  assert.equal(cache.has(0), false);
  assert.equal(cache.heldBytes, 0);
});

test('a chunk put while a load of it is under way wins over the loaded one', async () => {
  const cache = new ChunkCache(100);
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const reading = cache.get(0, async () => (await gate, chunk(10, 1)));
  cache.put(0, chunk(10, 2));
  release();
  assert.deepEqual(await reading, chunk(10, 2));
  assert.deepEqual(cache.take(0), chunk(10, 2));
  assert.equal(cache.heldBytes, 10);
});
