import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BufferReuse } from '#src/core/buffer-reuse.js';

test('BufferReuse hands a given-back buffer out again, for the same or a smaller size', () => {
  const r = new BufferReuse(1 << 20);
  const a = r.take(5000);
  assert.equal(a.length, 5000);
  r.give(a);
  const b = r.take(3000);
  assert.equal(b.buffer, a.buffer, 'the kept buffer is reused');
  assert.equal(b.length, 3000);
  // Taken again, it is no longer kept: the next request gets another buffer.
  const c = r.take(3000);
  assert.notEqual(c.buffer, b.buffer);
  r.give(b);
  r.give(c);
  // Larger than anything kept: a new one.
  assert.ok(![b.buffer, c.buffer].includes(r.take(9000).buffer));
});

test('BufferReuse keeps no more than its budget', () => {
  const r = new BufferReuse(64 * 1024);
  const bufs = [r.take(40 * 1024), r.take(40 * 1024)];
  for (const b of bufs) r.give(b);
  // 64 KiB budget: the first (rounded to 64 KiB) is kept, the second is not.
  assert.equal(r.take(40 * 1024).buffer, bufs[0]!.buffer);
  assert.notEqual(r.take(40 * 1024).buffer, bufs[1]!.buffer);
  // A request beyond the budget is served exactly, and never kept.
  const big = r.take(100 * 1024);
  assert.equal(big.buffer.byteLength, 100 * 1024);
  r.give(big);
  assert.notEqual(r.take(100 * 1024).buffer, big.buffer);
});
