import { test } from 'node:test';
import assert from 'node:assert/strict';
import { firstNonZero, firstNonZeroJs, isZero } from '#src/core/bytes.js';

/** The obvious byte loop the word-based scan must agree with. */
function reference(b: Uint8Array, start: number, end: number): number {
  for (let i = start; i < end; i++) if (b[i] !== 0) return i;
  return end;
}

test('firstNonZero finds the first non-zero byte at every alignment, start and end', () => {
  const backing = new Uint8Array(200);
  for (let shift = 0; shift < 4; shift++) {
    // A view that starts 0..3 bytes into its buffer: the word scan must still line up.
    const b = backing.subarray(shift, shift + 160);
    for (const hit of [-1, 0, 1, 3, 4, 31, 32, 33, 64, 127, 159]) {
      b.fill(0);
      if (hit >= 0) b[hit] = 0x80;
      for (const start of [0, 1, 2, 5, 32, 100]) {
        for (const end of [start, start + 1, 64, 159, 160]) {
          if (end < start) continue;
          assert.equal(firstNonZero(b, start, end), reference(b, start, end), `shift ${shift} hit ${hit} [${start}, ${end})`);
        }
      }
    }
  }
});

test('firstNonZero sees a set bit in any byte of a word', () => {
  const b = new Uint8Array(256);
  for (let i = 0; i < b.length; i++) {
    for (const bit of [1, 0x80]) {
      b.fill(0);
      b[i] = bit;
      assert.equal(firstNonZero(b), i);
    }
  }
  b.fill(0);
  assert.equal(firstNonZero(b), b.length, 'all zeros: the end');
});

test('isZero: all zeros, or not, whatever the length and offset', () => {
  assert.equal(isZero(new Uint8Array(0)), true);
  assert.equal(isZero(new Uint8Array(65536)), true);
  const b = new Uint8Array(4099);
  b[4098] = 1;
  assert.equal(isZero(b), false);
  assert.equal(isZero(b.subarray(1, 4098)), true);
});

test('firstNonZero over long ranges (the host addon scan, where loaded) agrees with the byte loop and the JavaScript scan', () => {
  let seed = 7;
  const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) % n;
  const backing = new Uint8Array(8192 + 16);
  for (let round = 0; round < 400; round++) {
    backing.fill(0);
    for (let k = rand(3); k > 0; k--) backing[rand(backing.length)] = 1 << rand(8);
    const shift = rand(9);
    const b = backing.subarray(shift, shift + 8192);
    const start = rand(b.length);
    // Mostly ranges long enough for the native scan, sometimes ending inside an 8-byte block.
    const end = Math.min(b.length, start + 200 + rand(b.length));
    const want = reference(b, start, end);
    assert.equal(firstNonZero(b, start, end), want, `round ${round} [${start}, ${end})`);
    assert.equal(firstNonZeroJs(b, start, end), want, `JS round ${round}`);
  }
});
