/**
 * ddPlan: qemu-img dd's arithmetic (count limits how far the source is read, skip is taken off
 * that; a count*bs past 2^63 reads everything; a skip past the end copies nothing).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ddPlan } from '#src/ops/dd.js';

test('ddPlan: the whole source by default', () => {
  assert.deepEqual(ddPlan(1 << 20), { outputSize: 1 << 20, start: 0, end: 1 << 20, skipPastEnd: false });
  assert.deepEqual(ddPlan(1000, { blockSize: 7 }), { outputSize: 1000, start: 0, end: 1000, skipPastEnd: false });
});

test('ddPlan: count bounds the read, skip comes off it', () => {
  assert.equal(ddPlan(1 << 20, { blockSize: 1024, count: 0 }).outputSize, 0);
  assert.deepEqual(ddPlan(1 << 20, { blockSize: 512, count: 2, skip: 1 }), { outputSize: 512, start: 512, end: 1024, skipPastEnd: false });
  assert.equal(ddPlan(1 << 20, { blockSize: 512, count: 1n << 62n }).outputSize, 1 << 20);
  assert.equal(ddPlan(1 << 20, { blockSize: 5, skip: 3 }).outputSize, (1 << 20) - 15);
});

test('ddPlan: a skip past the end (or past 2^63 bytes) copies nothing', () => {
  assert.deepEqual(ddPlan(1 << 20, { skip: 3000 }), { outputSize: 0, start: 1 << 20, end: 1 << 20, skipPastEnd: true });
  assert.equal(ddPlan(1 << 20, { blockSize: 1 << 30, skip: 1n << 40n }).skipPastEnd, true);
  assert.equal(ddPlan(1 << 20, { skip: 2048 }).skipPastEnd, false);
});
