import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ReplyBuffers } from '#src/nbd/reply-buffers.js';

test('reply buffers: a given-back buffer is reused for the same size, others are not taken back', () => {
  const pool = new ReplyBuffers(1024);
  const a = pool.take(100);
  assert.equal(a.length, 100);
  assert.ok(pool.owns(a));
  pool.give(a);
  assert.ok(!pool.owns(a), 'given back: no longer lent');
  assert.equal(pool.take(100), a);
  assert.notEqual(pool.take(100), a, 'a lent buffer is not handed out twice');
  const foreign = new Uint8Array(100);
  pool.give(foreign);
  assert.notEqual(pool.take(100), foreign);
  assert.ok(!pool.owns(a.subarray(1)), 'a view is not the buffer');
});

test('reply buffers: idle buffers are kept only up to the budget', () => {
  const pool = new ReplyBuffers(250);
  const bufs = [pool.take(100), pool.take(100), pool.take(100)];
  for (const b of bufs) pool.give(b);
  const again = [pool.take(100), pool.take(100), pool.take(100)];
  assert.equal(again.filter((b) => bufs.includes(b)).length, 2);
});
