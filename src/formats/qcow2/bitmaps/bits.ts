/**
 * Bit runs inside one cluster of bitmap data. Bit k of the bitmap is bit (k % 8) of byte k / 8,
 * least significant first: QEMU serializes its bitmap as little-endian words, which is this order.
 */

/** Set bits [from, to) of `buf`. */
export function setBits(buf: Uint8Array, from: number, to: number): void {
  let k = from;
  for (; k < to && k % 8 !== 0; k++) buf[k >> 3]! |= 1 << (k & 7);
  for (; k + 8 <= to; k += 8) buf[k >> 3] = 0xff;
  for (; k < to; k++) buf[k >> 3]! |= 1 << (k & 7);
}

export const getBit = (buf: Uint8Array, k: number): boolean => ((buf[k >> 3]! >> (k & 7)) & 1) === 1;

/** Every bit in [from, to) is set. */
export function allSet(buf: Uint8Array, from: number, to: number): boolean {
  let k = from;
  for (; k < to && k % 8 !== 0; k++) if (!getBit(buf, k)) return false;
  for (; k + 8 <= to; k += 8) if (buf[k >> 3] !== 0xff) return false;
  for (; k < to; k++) if (!getBit(buf, k)) return false;
  return true;
}

/**
 * The runs of equal bits in [from, to): [start, end, value] triples, in order. Generated one at a
 * time: a cluster of alternating bits has half a million runs, which are never held at once.
 */
export function* bitRuns(buf: Uint8Array, from: number, to: number): Generator<[number, number, boolean]> {
  let k = from;
  while (k < to) {
    const v = getBit(buf, k);
    let e = k + 1;
    while (e < to) {
      // Whole bytes at a time when aligned and uniform.
      if (e % 8 === 0 && e + 8 <= to && buf[e >> 3] === (v ? 0xff : 0)) {
        e += 8;
        continue;
      }
      if (getBit(buf, e) !== v) break;
      e++;
    }
    yield [k, e, v];
    k = e;
  }
}
