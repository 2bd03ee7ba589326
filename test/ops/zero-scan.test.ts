// The zero and equality scans that convert, compare and commit run over every byte they move:
// word-at-a-time where the buffer allows, byte-exact at every edge.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { allZero, blockRunEnd, blockRunEndJs, firstDifference, sameBytes, scanViewOf, zeroRange, type ScanView } from '#src/ops/zero-scan.js';
import { hostAddon } from '#src/host/native.node.js';

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

/** The same buffer as the browser path sees it: 32-bit words, or bytes only when unaligned. */
function wordView(b: Uint8Array): ScanView {
  return { bytes: b, words: (b.byteOffset & 3) === 0 ? new Uint32Array(b.buffer, b.byteOffset, b.byteLength >>> 2) : undefined };
}

test('zeroRange looks at its range only, whatever the alignment of its ends, on both paths', () => {
  const b = new Uint8Array(8192);
  b[4096] = 1;
  const views: [string, ScanView][] = [
    ['native', scanViewOf(b)],
    ['words', wordView(b)],
    ['bytes', { bytes: b }],
  ];
  for (const [name, v] of views) {
    assert.equal(zeroRange(v, 0, 4096), true, name);
    assert.equal(zeroRange(v, 4097, 8192), true, name);
    assert.equal(zeroRange(v, 4096, 8192), false, name);
    assert.equal(zeroRange(v, 4095, 4097), false, name);
    assert.equal(zeroRange(v, 4001, 4096), true, name);
    assert.equal(zeroRange(v, 4001, 4099), false, name);
    // Past the first 16 bytes, and past the first 64 KiB piece of the native path.
    assert.equal(zeroRange(v, 3000, 4097), false, name);
  }
  const big = new Uint8Array(200 * 1024);
  big[150 * 1024 + 3] = 9;
  assert.equal(zeroRange(scanViewOf(big), 0, 150 * 1024), true);
  assert.equal(zeroRange(scanViewOf(big), 0, big.length), false);
  assert.equal(zeroRange(scanViewOf(big.subarray(1)), 0, big.length - 1), false, 'unaligned views too');
  assert.equal(wordView(b.subarray(1)).words, undefined);
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

test('firstDifference narrows a difference to its byte in large buffers, at any offset', () => {
  const size = 3 * 1024 * 1024 + 5;
  const a = new Uint8Array(size).fill(0x5a);
  const b = a.slice();
  assert.equal(firstDifference(a, b), -1);
  for (const at of [0, 255, 256, 4095, 4096, 2 * 1024 * 1024 + 17, size - 1]) {
    b[at] = 0;
    assert.equal(firstDifference(a, b), at, `byte ${at}`);
    assert.equal(sameBytes(a, b), false);
    // A later difference does not hide this one.
    b[size - 1] = 1;
    assert.equal(firstDifference(a, b), at);
    b[size - 1] = 0x5a;
    b[at] = 0x5a;
  }
  // Views that start at odd offsets compare their own bytes.
  assert.equal(firstDifference(a.subarray(3), b.subarray(3)), -1);
  b[1000] = 1;
  assert.equal(firstDifference(a.subarray(3), b.subarray(3)), 997);
  assert.equal(sameBytes(a.subarray(3), b.subarray(3)), false);
});

test('blockRunEnd finds where a run of zero or data blocks ends, natively and in JavaScript alike', () => {
  const unit = 4096;
  const b = new Uint8Array(10 * unit + 100);
  // Blocks 0-1 zero, 2 data (one byte at its very end), 3-5 zero, 6-7 data (first byte), 8-9
  // zero, then a short tail block of data (last byte).
  b[3 * unit - 1] = 1;
  b[6 * unit] = 2;
  b[7 * unit + 2000] = 3;
  b[b.length - 1] = 4;
  const v = scanViewOf(b);
  const cases: [number, number, boolean, number][] = [
    [0, b.length, true, 2 * unit],
    [0, b.length, false, 0],
    [2 * unit, b.length, false, 3 * unit],
    [3 * unit, b.length, true, 6 * unit],
    [6 * unit, b.length, false, 8 * unit],
    [8 * unit, b.length, true, 10 * unit],
    [10 * unit, b.length, false, b.length],
    // A limit inside a run ends the run there; an empty range ends at once.
    [3 * unit, 5 * unit, true, 5 * unit],
    [4 * unit, 4 * unit, true, 4 * unit],
    // Blocks are counted from `from`: from the middle of block 2, the first block holds its byte.
    [2 * unit + 512, b.length, true, 2 * unit + 512],
  ];
  const addon = hostAddon();
  for (const [from, end, zero, want] of cases) {
    assert.equal(blockRunEnd(v, from, end, unit, zero), want, `blockRunEnd(${from}, ${end}, ${zero})`);
    assert.equal(blockRunEndJs(v, from, end, unit, zero), want, `JS (${from}, ${end}, ${zero})`);
    assert.equal(blockRunEndJs({ bytes: b }, from, end, unit, zero), want, `JS bytes (${from}, ${end}, ${zero})`);
    if (addon?.blockRunEnd) assert.equal(addon.blockRunEnd(b, from, end, unit, zero), want, `addon (${from}, ${end}, ${zero})`);
  }
});

test('the native blockRunEnd agrees with the JavaScript scan on random sparse buffers, at any alignment', { skip: !hostAddon()?.blockRunEnd && 'host addon without blockRunEnd' }, () => {
  const scan = hostAddon()!.blockRunEnd!;
  let seed = 12345;
  const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) % n;
  const backing = new Uint8Array(64 * 1024 + 16);
  for (let round = 0; round < 200; round++) {
    backing.fill(0);
    for (let k = rand(6); k > 0; k--) backing[rand(backing.length)] = 1 + rand(255);
    const shift = rand(9);
    const b = backing.subarray(shift, shift + 64 * 1024);
    const unit = [512, 1000, 4096, 65536][rand(4)]!;
    const from = rand(b.length);
    const end = from + rand(b.length - from + 1);
    const zero = rand(2) === 0;
    assert.equal(scan(b, from, end, unit, zero), blockRunEndJs({ bytes: b }, from, end, unit, zero), `round ${round}`);
  }
  assert.throws(() => scan(backing, 0, backing.length + 1, 4096, true), /blockRunEnd/);
  assert.throws(() => scan(backing, 10, 5, 4096, true), /blockRunEnd/);
});
