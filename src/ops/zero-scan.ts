/**
 * Fast scans over copy buffers: "is this all zeros" and "are these equal". The copy loops run them
 * over every byte they move, so they look at 4 bytes at a time where the buffers are aligned
 * (plain 32-bit reads; BigInt-based 64-bit reads are much slower in V8).
 */

/** True when every byte of `b` is zero. */
export function allZero(b: Uint8Array): boolean {
  return zeroRange(b, b.byteLength >= 32 ? wordsOf(b) : undefined, 0, b.byteLength);
}

/**
 * `b` as 32-bit words, or undefined when it is not 4-byte aligned. Made once for a buffer whose
 * blocks are then tested one by one with zeroRange: a view per 4 KiB block was most of the garbage
 * of a raw -> qcow2 convert (131072 views per 512 MiB).
 */
export function wordsOf(b: Uint8Array): Uint32Array | undefined {
  return (b.byteOffset & 3) === 0 ? new Uint32Array(b.buffer, b.byteOffset, b.byteLength >>> 2) : undefined;
}

/** True when b[start, end) is all zeros; `words` is wordsOf(b) (or undefined: bytes only). */
export function zeroRange(b: Uint8Array, words: Uint32Array | undefined, start: number, end: number): boolean {
  let i = start;
  if (words && (start & 3) === 0 && end - start >= 32) {
    let j = start >>> 2;
    const m = end >>> 2;
    // Four words per step: OR them so one branch decides.
    for (; j + 4 <= m; j += 4) if ((words[j]! | words[j + 1]! | words[j + 2]! | words[j + 3]!) !== 0) return false;
    for (; j < m; j++) if (words[j] !== 0) return false;
    i = m << 2;
  }
  for (; i < end; i++) if (b[i] !== 0) return false;
  return true;
}

/** Index of the first byte where `a` and `b` differ (compared over the shorter length), or -1. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  if ((a.byteOffset & 3) === 0 && (b.byteOffset & 3) === 0 && n >= 32) {
    const wa = new Uint32Array(a.buffer, a.byteOffset, n >>> 2);
    const wb = new Uint32Array(b.buffer, b.byteOffset, n >>> 2);
    let j = 0;
    while (j < wa.length && wa[j] === wb[j]) j++;
    i = j << 2;
  }
  for (; i < n; i++) if (a[i] !== b[i]) return i;
  return -1;
}

export const sameBytes = (a: Uint8Array, b: Uint8Array): boolean => a.length === b.length && firstDifference(a, b) < 0;
