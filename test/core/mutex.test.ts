import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Mutex } from '#src/core/mutex.js';

test('runs one at a time, in call order; a failure reaches its own caller only', async () => {
  const m = new Mutex();
  const order: string[] = [];
  const a = m.run(async () => {
    order.push('a start');
    await new Promise((r) => setImmediate(r));
    order.push('a end');
  });
  const b = m.run(() => {
    order.push('b');
    throw new Error('b failed');
  });
  const c = m.run(async () => order.push('c'));
  await a;
  await assert.rejects(b, /b failed/);
  await c;
  assert.deepEqual(order, ['a start', 'a end', 'b', 'c']);
});

test('mayOvertake: false while a run that may not be overtaken holds or waits, true with overtakable runs only', async () => {
  const m = new Mutex();
  assert.equal(m.mayOvertake, true);
  let release!: () => void;
  const held = m.run(() => new Promise<void>((r) => (release = r)), true);
  assert.equal(m.mayOvertake, true);
  const blocking = m.run(async () => undefined);
  assert.equal(m.mayOvertake, false);
  await new Promise((r) => setImmediate(r));
  release();
  await held;
  await blocking;
  await new Promise((r) => setImmediate(r));
  assert.equal(m.mayOvertake, true);
});
