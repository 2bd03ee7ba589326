// The zero and equality scans that convert, compare and commit run over every byte they move:
// word-at-a-time where the buffer allows, byte-exact at every edge.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { allZero, firstDifference, sameBytes, wordsOf, zeroRange } from './zero-scan.js';

test('allZero finds a single set byte anywhere, in aligned and unaligned views', () => {
  const backing = new Uint8Array(4096 + 8);
  for (const shift of [0, 1, 2, 3, 4]) {
    const b = backing.subarray(shift, shift + 4096);
    assert.equal(allZero(b), true, `shift ${shift}`);
    for (const at of [0, 1, 31, 32, 33, 2047, 4092, 4095]) {
      b[at] = 0x80;
      assert.equal(allZero(b), false, `shift ${shift}, byte ${at}`);
      b[at] = 0;
    }
  }
  assert.equal(allZero(new Uint8Array(0)), true);
});

test('zeroRange looks at its range only, whatever the alignment of its ends', () => {
  const b = new Uint8Array(8192);
  const words = wordsOf(b);
  assert.ok(words);
  b[4096] = 1;
  assert.equal(zeroRange(b, words, 0, 4096), true);
  assert.equal(zeroRange(b, words, 4097, 8192), true);
  assert.equal(zeroRange(b, words, 4096, 8192), false);
  assert.equal(zeroRange(b, words, 4095, 4097), false);
  assert.equal(zeroRange(b, words, 4001, 4096), true);
  assert.equal(zeroRange(b, words, 4001, 4099), false);
  // Without words (an unaligned buffer) the answers are the same.
  assert.equal(zeroRange(b, undefined, 0, 4096), true);
  assert.equal(zeroRange(b, undefined, 4000, 4100), false);
  assert.equal(wordsOf(b.subarray(1)), undefined);
});

test('firstDifference and sameBytes report the first differing byte', () => {
  const a = new Uint8Array(1000).fill(7);
  const c = a.slice();
  assert.equal(firstDifference(a, c), -1);
  assert.equal(sameBytes(a, c), true);
  c[999] = 8;
  assert.equal(firstDifference(a, c), 999);
  c[37] = 8;
  assert.equal(firstDifference(a, c), 37);
  assert.equal(sameBytes(a, c), false);
  assert.equal(sameBytes(a, a.subarray(0, 999)), false);
});
