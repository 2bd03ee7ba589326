import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TableCache } from '#src/formats/qcow2/metadata-cache.js';

function gate(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

test('a table load racing a put does not overwrite the newer table', async () => {
  const g = gate();
  const cache = new TableCache({
    tableBytes: 4,
    budgetBytes: 64,
    load: async (_, into) => {
      await g.promise;
      into.fill(1); // the disk copy, older than the put
    },
  });
  const reading = cache.get(0);
  await cache.put(0, new Uint8Array(4).fill(9), true);
  g.resolve();
  assert.deepEqual([...(await reading).data], [9, 9, 9, 9]);
  assert.deepEqual([...cache.peek(0)!.data], [9, 9, 9, 9]);
  assert.equal(cache.peek(0)!.dirty, true);
});

test('a dirty table being written back on eviction stays readable from memory until the write lands', async () => {
  const disk = new Map<number, number>();
  const w = gate();
  let loads = 0;
  const order: string[] = [];
  const cache = new TableCache({
    tableBytes: 1,
    budgetBytes: 4, // four tables
    load: async (off, into) => {
      loads++;
      into[0] = disk.get(off) ?? 0;
    },
    writeBack: async (off, data) => {
      order.push(`write ${off}`);
      await w.promise;
      disk.set(off, data[0]!);
    },
    dependsOn: async () => {
      order.push('dependency');
    },
  });
  await cache.put(0, Uint8Array.of(5), true);
  for (const off of [1, 2, 3]) await cache.put(off, Uint8Array.of(off), false);
  const evicting = cache.put(4, Uint8Array.of(4), false); // evicts 0, which is dirty
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(order, ['dependency', 'write 0']);
  assert.equal((await cache.get(0)).data[0], 5); // from memory, not the disk being written
  assert.equal(loads, 0);
  w.resolve();
  await evicting;
  assert.equal(disk.get(0), 5);
  await cache.flush();
  assert.equal(disk.size, 1);
});

test('flush waits for a write-back under way', async () => {
  const w = gate();
  const disk = new Map<number, number>();
  const cache = new TableCache({
    tableBytes: 1,
    budgetBytes: 4,
    load: async () => {},
    writeBack: async (off, data) => {
      await w.promise;
      disk.set(off, data[0]!);
    },
  });
  await cache.put(0, Uint8Array.of(7), true);
  const first = cache.flush();
  let second = false;
  const flushed = cache.flush().then(() => (second = true));
  await new Promise((r) => setImmediate(r));
  assert.equal(second, false);
  w.resolve();
  await Promise.all([first, flushed]);
  assert.equal(disk.get(0), 7);
});

test('changed() marks a cached table dirty in place (same object, nothing to wait for); a table no longer cached is put back', async () => {
  const cache = new TableCache({ tableBytes: 4, budgetBytes: 16, load: async () => undefined, writeBack: async () => undefined });
  const t = await cache.put(0, new Uint8Array(4), false);
  t.data[0] = 7;
  assert.equal(cache.changed(t), undefined);
  assert.equal(cache.peek(0), t);
  assert.equal(t.dirty, true);
  cache.drop(0);
  const back = cache.changed(t);
  assert.ok(back instanceof Promise);
  await back;
  assert.equal(cache.peek(0)!.data[0], 7);
  assert.equal(cache.peek(0)!.dirty, true);
});

test('a reader never writes a table back: it drops clean tables, and leaves dirty ones to a trim it asks the writer for', async () => {
  const order: string[] = [];
  const jobs: Array<() => Promise<void>> = [];
  const cache = new TableCache({
    tableBytes: 1,
    budgetBytes: 4, // four tables
    load: async (off, into) => {
      into[0] = off;
    },
    writeBack: async (off) => {
      order.push(`write ${off}`);
    },
    dependsOn: async () => {
      order.push('dependency');
    },
    scheduleWriteBack: (job) => jobs.push(job),
  });
  await cache.put(0, Uint8Array.of(0), false);
  for (const off of [1, 2, 3]) await cache.put(off, Uint8Array.of(off), true);
  cache.changed(await cache.get(4)); // drops 0, the clean one; 4 is dirty then
  assert.equal(cache.peek(0), undefined);
  assert.equal(cache.size, 4);
  await cache.get(5); // only dirty tables to drop: over budget, and a trim asked for
  await cache.get(6); // drops 5 (clean); the trim is asked for once
  assert.deepEqual(order, []);
  assert.equal(jobs.length, 1);
  assert.equal(cache.size, 5);
  await jobs[0]!(); // the writer runs it under its lock: least recently used first
  assert.deepEqual(order, ['dependency', 'write 1']);
  assert.equal(cache.size, 4);
  // The writer's own loads write back at once.
  await cache.getForWrite(7);
  assert.deepEqual(order, ['dependency', 'write 1', 'dependency', 'write 2']);
  assert.equal(cache.size, 4);
});
