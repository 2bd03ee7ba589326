/** Ordering of concurrent requests: what may overlap in time and what must wait. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { RequestOrder } from '#src/nbd/order.js';

/** A task that finishes when told to, logging when it starts and ends. */
function gate(log: string[], name: string) {
  let open!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  return {
    open,
    fn: async () => {
      log.push(`${name} start`);
      await opened;
      log.push(`${name} end`);
    },
  };
}

const tick = () => new Promise((r) => setImmediate(r));

test('overlapping writes run in the order they were sent', async () => {
  const order = new RequestOrder();
  const log: string[] = [];
  const a = gate(log, 'a');
  const b = gate(log, 'b');
  const pa = order.run('write', 0, 4096, a.fn);
  const pb = order.run('write', 2048, 4096, b.fn);
  await tick();
  assert.deepEqual(log, ['a start']);
  b.open();
  a.open();
  await Promise.all([pa, pb]);
  assert.deepEqual(log, ['a start', 'a end', 'b start', 'b end']);
});

test('disjoint writes and concurrent reads run at once', async () => {
  const order = new RequestOrder();
  const log: string[] = [];
  const tasks = [gate(log, 'w1'), gate(log, 'w2'), gate(log, 'r1'), gate(log, 'r2')];
  const ps = [order.run('write', 0, 512, tasks[0]!.fn), order.run('write', 512, 512, tasks[1]!.fn), order.run('read', 4096, 512, tasks[2]!.fn), order.run('read', 4096, 512, tasks[3]!.fn)];
  await tick();
  assert.equal(log.length, 4);
  assert.equal(order.size, 4);
  tasks.forEach((t) => t.open());
  await Promise.all(ps);
  assert.equal(order.size, 0);
});

test('a read waits for an earlier overlapping write, not for a later one', async () => {
  const order = new RequestOrder();
  const log: string[] = [];
  const w = gate(log, 'w');
  const r = gate(log, 'r');
  const pw = order.run('write', 0, 4096, w.fn);
  const pr = order.run('read', 100, 10, r.fn);
  await tick();
  assert.deepEqual(log, ['w start']);
  w.open();
  r.open();
  await Promise.all([pw, pr]);
  assert.deepEqual(log, ['w start', 'w end', 'r start', 'r end']);
});

test('a flush waits for every earlier write, wherever it is, but not for reads', async () => {
  const order = new RequestOrder();
  const log: string[] = [];
  const w = gate(log, 'w');
  const r = gate(log, 'r');
  const f = gate(log, 'f');
  const pw = order.run('write', 1 << 20, 512, w.fn);
  const pr = order.run('read', 0, 512, r.fn);
  const pf = order.run('flush', 0, 0, f.fn);
  await tick();
  assert.deepEqual(log, ['w start', 'r start']);
  w.open();
  await pw;
  await tick();
  assert.ok(log.includes('f start'));
  r.open();
  f.open();
  await Promise.all([pr, pf]);
});

test('a failed request releases those waiting on it', async () => {
  const order = new RequestOrder();
  const failed = order.run('write', 0, 512, async () => {
    throw new Error('disk on fire');
  });
  const next = order.run('write', 0, 512, async () => 'ran');
  await assert.rejects(failed, /disk on fire/);
  assert.equal(await next, 'ran');
  await order.idle();
  assert.equal(order.size, 0);
});

test('wouldWait: true exactly when run() would hold the request back', async () => {
  const order = new RequestOrder();
  assert.equal(order.wouldWait('read', 0, 10), false);
  let release!: () => void;
  const write = order.run('write', 100, 50, () => new Promise<void>((r) => (release = r)));
  await Promise.resolve();
  assert.equal(order.wouldWait('read', 0, 100), false, 'read beside the write');
  assert.equal(order.wouldWait('read', 149, 1), true, 'read overlapping the write');
  assert.equal(order.wouldWait('write', 120, 1), true, 'write overlapping the write');
  assert.equal(order.wouldWait('flush', 0, 0), true, 'flush behind a write');
  release();
  await write;
  await order.idle();
  assert.equal(order.wouldWait('read', 149, 1), false);
  const read = order.run('read', 0, 10, async () => undefined);
  assert.equal(order.wouldWait('read', 0, 10), false, 'reads never wait for reads');
  assert.equal(order.wouldWait('write', 5, 1), true, 'a write waits for an overlapping read');
  await read;
});
