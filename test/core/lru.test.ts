import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Lru } from '#src/core/lru.js';

/** A promise and the functions that settle it (a load the test releases by hand). */
function gate<T>(): { promise: Promise<T>; resolve: (v: T) => void; reject: (e: unknown) => void } {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => ((resolve = res), (reject = rej)));
  return { promise, resolve, reject };
}

test('a hit makes the entry the most recently used; the least recently used goes first', () => {
  const lru = new Lru<number, string>({ budget: 3 });
  lru.set(1, 'a');
  lru.set(2, 'b');
  lru.set(3, 'c');
  assert.equal(lru.get(1), 'a'); // 2 is now the least recently used
  lru.set(4, 'd');
  assert.deepEqual([...lru.keys()], [3, 1, 4]);
  assert.equal(lru.peek(3), 'c'); // peek leaves the order alone
  lru.set(5, 'e');
  assert.deepEqual([...lru.keys()], [1, 4, 5]);
});

test('touching or replacing the newest entry again keeps the order and the count; removing it forgets it was newest', () => {
  const lru = new Lru<number, Uint8Array>({ budget: 30, size: (v) => v.length });
  lru.set(1, new Uint8Array(10));
  lru.set(2, new Uint8Array(10));
  for (let i = 0; i < 3; i++) assert.equal(lru.get(2)?.length, 10); // already the newest
  lru.set(2, new Uint8Array(5)); // replaced where it stands, re-counted
  assert.equal(lru.held, 15);
  assert.deepEqual([...lru.keys()], [1, 2]);
  lru.get(1);
  assert.deepEqual([...lru.keys()], [2, 1]);
  lru.delete(1);
  // 2 is the only entry now, but it is not known as the newest: a get still orders it right.
  lru.set(3, new Uint8Array(10));
  lru.get(2);
  assert.deepEqual([...lru.keys()], [3, 2]);
  lru.set(4, new Uint8Array(20)); // over budget: 3, the least recently used, goes
  assert.deepEqual([...lru.keys()], [2, 4]);
  assert.equal(lru.held, 25);
  lru.clear();
  lru.set(5, new Uint8Array(1));
  lru.get(5);
  assert.deepEqual([...lru.keys()], [5]);
  assert.equal(lru.held, 1);
});

test('the budget counts what size returns (bytes), and replacing an entry re-counts it', () => {
  const lru = new Lru<string, Uint8Array>({ budget: 30, size: (v) => v.length });
  lru.set('a', new Uint8Array(10));
  lru.set('b', new Uint8Array(10));
  lru.set('c', new Uint8Array(10));
  assert.equal(lru.held, 30);
  lru.set('a', new Uint8Array(5));
  assert.equal(lru.held, 25);
  lru.set('d', new Uint8Array(15)); // 40 > 30: b (the oldest now) goes
  assert.deepEqual([...lru.keys()], ['c', 'a', 'd']);
  assert.equal(lru.held, 30);
  assert.equal(lru.delete('c'), true);
  assert.equal(lru.held, 20);
  lru.clear();
  assert.equal(lru.held, 0);
  assert.equal(lru.size, 0);
});

test('entries that may not be evicted stay; the oldest evictable one goes instead', () => {
  const pinned = new Set([1]);
  const lru = new Lru<number, string>({ budget: 2, canEvict: (k) => !pinned.has(k) });
  lru.set(1, 'a');
  lru.set(2, 'b');
  lru.set(3, 'c');
  assert.deepEqual([...lru.keys()], [1, 3]);
  pinned.add(3);
  lru.set(4, 'd'); // 1 and 3 pinned: the newest is the only one that may go
  assert.deepEqual([...lru.keys()], [1, 3]);
  pinned.clear();
  lru.set(5, 'e');
  assert.deepEqual([...lru.keys()], [3, 5]);
});

test('concurrent loads of one key share one load; a hit does not load', async () => {
  const lru = new Lru<number, string>({ budget: 4 });
  let loads = 0;
  const g = gate<string>();
  const load = (k: number) => (loads++, g.promise.then((v) => `${v}${k}`));
  const a = lru.load(7, load);
  const b = lru.load(7, load);
  assert.equal(lru.isLoading(7), true);
  g.resolve('x');
  assert.deepEqual(await Promise.all([a, b]), ['x7', 'x7']);
  assert.equal(await lru.load(7, load), 'x7');
  assert.equal(loads, 1);
  assert.equal(lru.isLoading(7), false);
});

test('a failed load is forgotten: every waiter sees the error, the next reader loads again', async () => {
  const lru = new Lru<number, string>({ budget: 4 });
  const g = gate<string>();
  const a = lru.load(1, () => g.promise);
  const b = lru.load(1, () => g.promise);
  g.reject(new Error('flaky'));
  await assert.rejects(a, /flaky/);
  await assert.rejects(b, /flaky/);
  assert.equal(lru.has(1), false);
  assert.equal(await lru.load(1, async () => 'ok'), 'ok');
});

test('a load racing a set is stale: the newer value stays, and the waiters get it', async () => {
  const lru = new Lru<number, string>({ budget: 4 });
  const g = gate<string>();
  const a = lru.load(1, () => g.promise);
  lru.set(1, 'new');
  g.resolve('old from disk');
  assert.equal(await a, 'new');
  assert.equal(lru.get(1), 'new');
});

test('a load racing a delete or clear is not stored; a later load starts afresh', async () => {
  const lru = new Lru<number, string>({ budget: 4 });
  const g = gate<string>();
  const a = lru.load(1, () => g.promise);
  lru.delete(1);
  assert.equal(lru.isLoading(1), false);
  const fresh = gate<string>();
  const b = lru.load(1, () => fresh.promise);
  g.resolve('stale');
  assert.equal(await a, 'stale'); // what its reader asked for, but not kept
  assert.equal(lru.has(1), false);
  fresh.resolve('fresh');
  assert.equal(await b, 'fresh');
  assert.equal(lru.get(1), 'fresh');

  const c = gate<string>();
  const d = lru.load(2, () => c.promise);
  lru.clear();
  c.resolve('stale');
  await d;
  assert.equal(lru.has(2), false);
});

test('a freshly loaded entry is not evicted by its own insertion', async () => {
  const dirty = new Set([1, 2]);
  const lru = new Lru<number, string>({ budget: 2, canEvict: (k) => !dirty.has(k) });
  lru.set(1, 'a');
  lru.set(2, 'b');
  assert.equal(await lru.load(3, async () => 'c'), 'c');
  assert.equal(lru.has(3), true);
});

test('trimAsync writes a dirty entry back through the hook before dropping it, strictly oldest first', async () => {
  const dirty = new Set<number>();
  const written: number[] = [];
  const h = gate<void>();
  const lru = new Lru<number, string>({
    budget: 2,
    canEvict: (k) => !dirty.has(k),
    beforeEvict: async (k) => {
      await h.promise;
      written.push(k);
      dirty.delete(k);
    },
  });
  lru.set(1, 'a');
  dirty.add(1);
  lru.set(2, 'b');
  lru.set(3, 'c'); // with a hook, inserting does not trim
  assert.equal(lru.size, 3);
  const trimming = lru.trimAsync();
  // While the write runs the entry is still there: a reader gets the memory copy, not the disk's.
  await Promise.resolve();
  assert.equal(lru.get(1), 'a');
  h.resolve();
  await trimming;
  assert.deepEqual(written, [1]);
  assert.deepEqual([...lru.keys()], [2, 3]);
});

test('trimAsync keeps an entry changed again while its hook ran, and one replaced meanwhile', async () => {
  const dirty = new Set<number>([1]);
  const h = gate<void>();
  const lru = new Lru<number, string>({
    budget: 1,
    canEvict: (k) => !dirty.has(k),
    beforeEvict: async (k) => {
      dirty.delete(k);
      await h.promise;
    },
  });
  lru.set(1, 'a');
  lru.set(2, 'b');
  const trimming = lru.trimAsync(2);
  await Promise.resolve();
  dirty.add(1); // written to again during the write-back
  h.resolve();
  await trimming;
  assert.deepEqual([...lru.keys()], [1, 2]);
});

test('without a hook, trimAsync leaves entries that may not be evicted', async () => {
  const lru = new Lru<number, string>({ budget: 1, canEvict: (k) => k !== 1 });
  lru.set(1, 'a');
  lru.set(2, 'b'); // trims synchronously: 2 is the only evictable one
  assert.deepEqual([...lru.keys()], [1]);
  await lru.trimAsync();
  assert.deepEqual([...lru.keys()], [1]);
});
