/**
 * QCOW2 refcounts on disk: the refcount table (u64 offsets of refcount blocks) and the refcount
 * blocks (one cluster of `refcount_bits`-wide counters, one per host cluster).
 *
 * Entry layout inside a block (docs/notes/qcow2-pitfalls.md §6, checked against qemu 7.2):
 *   - widths 1, 2, 4: packed into bytes, the FIRST entry in the LEAST significant bits of a byte;
 *   - widths 8..64: one big-endian integer per entry.
 * 64-bit counters above 2^53 cannot be exact in a number: getRefcount gives the nearest double for
 * them (never equal to a count a table can reach, so comparisons with 0, 1 or a number of references
 * stay right), and the places where exactness matters use the exact helpers below: addRefcount
 * (the allocator's increments and decrements, in BigInt for that width) and refcountText (check's
 * messages). QEMU holds every width in a uint64_t; a count past 2^53 is valid, not corruption.
 */
import { corrupt, invalidArgument } from '../../core/errors.js';
import { firstNonZero, view } from '../../core/bytes.js';

export const REFCOUNT_WIDTHS = [1, 2, 4, 8, 16, 32, 64] as const;

export function checkRefcountBits(bits: number): void {
  if (!(REFCOUNT_WIDTHS as readonly number[]).includes(bits)) {
    throw invalidArgument('Refcount width must be a power of two and may not exceed 64 bits');
  }
}

/**
 * The largest counter a width can hold. For 64 bits that is 2^64 - 1, which a number rounds to
 * 2^64: fine for "is this counter full" questions up to that rounding; the allocator's own
 * arithmetic on that width is exact (addRefcount).
 */
export function maxRefcount(bits: number): number {
  // Shifts, not 2 ** bits: this runs for every counter set, and V8 calls pow() for a variable exponent.
  return bits === 64 ? MAX_U64_NUMBER : bits === 32 ? 0xffffffff : (1 << bits) - 1;
}

const MAX_U64 = (1n << 64n) - 1n;
const MAX_U64_NUMBER = Number(MAX_U64);

/** What addRefcount found when the result does not fit: nothing was stored. */
export type RefcountMisfit = 'underflow' | 'overflow';

/**
 * Entry `index` plus `delta`, exact at every width (64-bit counters are added as BigInt): the new
 * count (as getRefcount would read it back), or why it does not fit (below zero, past the width).
 * Stored only when `store` and it fits.
 */
export function addRefcount(block: Uint8Array, index: number, bits: number, delta: number, store: boolean): number | RefcountMisfit {
  if (bits !== 64) {
    const v = getRefcount(block, index, bits) + delta;
    if (v < 0) return 'underflow';
    if (v > maxRefcount(bits)) return 'overflow';
    if (store) setRefcount(block, index, bits, v);
    return v;
  }
  const dv = view(block);
  const v = dv.getBigUint64(index * 8) + BigInt(delta);
  if (v < 0n) return 'underflow';
  if (v > MAX_U64) return 'overflow';
  if (store) dv.setBigUint64(index * 8, v);
  return Number(v);
}

/** Entry `index` in decimal, exact at every width (for messages: check prints 64-bit counts whole). */
export function refcountText(block: Uint8Array, index: number, bits: number): string {
  return bits === 64 ? view(block).getBigUint64(index * 8).toString() : String(getRefcount(block, index, bits));
}

/** How many clusters one refcount block describes. */
export function entriesPerBlock(clusterSize: number, refcountBits: number): number {
  return (clusterSize * 8) / refcountBits;
}

/** Read entry `index` of a refcount block. */
export function getRefcount(block: Uint8Array, index: number, bits: number): number {
  switch (bits) {
    case 1:
    case 2:
    case 4: {
      const perByte = 8 / bits;
      const shift = (index % perByte) * bits;
      return (block[Math.floor(index / perByte)]! >> shift) & ((1 << bits) - 1);
    }
    case 8:
      return block[index]!;
    case 16:
      return (block[index * 2]! << 8) | block[index * 2 + 1]!;
    case 32:
      return view(block).getUint32(index * 4);
    case 64:
      // Exact up to 2^53; past it the nearest double (see the top of this file).
      return Number(view(block).getBigUint64(index * 8));
    default:
      throw invalidArgument(`refcount width ${bits} is not supported`);
  }
}

/**
 * Store `value` into entry `index` of a refcount block. The caller checks it fits (maxRefcount);
 * a count past 2^53 is only ever stored by addRefcount.
 */
export function setRefcount(block: Uint8Array, index: number, bits: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0 || value > maxRefcount(bits)) {
    throw invalidArgument(`refcount ${value} does not fit in ${bits} bits`);
  }
  switch (bits) {
    case 1:
    case 2:
    case 4: {
      const perByte = 8 / bits;
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      const i = Math.floor(index / perByte);
      block[i] = (block[i]! & ~mask) | (value << shift);
      return;
    }
    case 8:
      block[index] = value;
      return;
    case 16:
      block[index * 2] = value >>> 8;
      block[index * 2 + 1] = value & 0xff;
      return;
    case 32:
      view(block).setUint32(index * 4, value);
      return;
    case 64:
      view(block).setBigUint64(index * 8, BigInt(value));
      return;
    default:
      throw invalidArgument(`refcount width ${bits} is not supported`);
  }
}

/**
 * Whether entries [first, first + n) of a block are all zero. For the widths of 8 bits and more
 * the entries are whole bytes and one word scan answers (core/bytes.ts); the allocator asks this
 * once per allocation, and a loop of getRefcount calls there made V8 optimise the allocator and
 * its callers on the main thread within a few hundred requests.
 */
export function refcountsZero(block: Uint8Array, first: number, n: number, bits: number): boolean {
  if (bits >= 8) {
    // Byte offsets inside one refcount block (at most 2 MiB): `| 0` keeps them small integers
    // for the scan's loop (see Qcow2Writer.freshRun).
    const from = ((first * bits) / 8) | 0;
    const to = (((first + n) * bits) / 8) | 0;
    return firstNonZero(block, from, to) === to;
  }
  for (let i = first; i < first + n; i++) if (getRefcount(block, i, bits) !== 0) return false;
  return true;
}

/** A 16-bit word whose bytes in memory are 0x00 0x01 (big-endian 1) on this host. */
const REFCOUNT_ONE_16 = new Uint16Array(new Uint8Array([0, 1]).buffer)[0]!;

/** Entries [first, first + n) of a block become 1 (a fresh run of clusters). */
export function setRefcountsToOne(block: Uint8Array, first: number, n: number, bits: number): void {
  if (bits === 16) {
    // The default width: big-endian 0x0001 per entry. Where the entries are 2-byte aligned in
    // memory (always, for blocks of their own), one fill of 16-bit words holding those two bytes
    // in the host's order: no JavaScript per entry (a byte-store loop in V8's baseline tier costs
    // a builtin call per byte).
    if (((block.byteOffset + first * 2) & 1) === 0) {
      new Uint16Array(block.buffer, block.byteOffset + first * 2, n).fill(REFCOUNT_ONE_16);
      return;
    }
    for (let i = first * 2, end = (first + n) * 2; i < end; i += 2) {
      block[i] = 0;
      block[i + 1] = 1;
    }
    return;
  }
  for (let i = first; i < first + n; i++) setRefcount(block, i, bits, 1);
}

/**
 * Decode a refcount table: the block offset of every entry (0 = no block). An entry's bits 9..63
 * are the offset, bits 0..8 are reserved (zero). Offsets must be cluster aligned, below 2^53 and
 * have the reserved bits clear; anything else is corruption (alignment may be left to the user).
 */
export function decodeRefcountTable(buf: Uint8Array, entries: number, clusterSize: number, options: { unalignedLater?: boolean } = {}): number[] {
  return decodeRefcountTableInto(new Array<number>(entries).fill(0), buf, entries, clusterSize, options);
}

/**
 * decodeRefcountTable into `out` (zeros, at least `entries` long), which it returns. The allocator
 * (alloc.ts) decodes into a Float64Array: a zeroed typed array's pages are touched only where an
 * entry is set, where the array of numbers for one 64 KiB table cluster (8192 entries, nearly all
 * zero) cost every writable open ~45 page faults (its filling, and V8's stores into a new array).
 */
export function decodeRefcountTableInto<T extends { [i: number]: number }>(out: T, buf: Uint8Array, entries: number, clusterSize: number, options: { unalignedLater?: boolean } = {}): T {
  const dv = view(buf);
  // Most entries are zero (tables are sized for growth: one entry per 2 GiB of file with 64 KiB
  // clusters). They are skipped by firstNonZero's word scan, shared with the rest of the library,
  // so this function has no hot loop of its own: its own loop over every entry ran cold on each
  // open for writing, was compiled on the stack (OSR) and thrown away when the call went on
  // ("insufficient type feedback"), and a second table's decoding then took 1-4 ms, not ~0.4.
  const end = entries * 8;
  for (let at = firstNonZero(buf, 0, end); at < end; at = firstNonZero(buf, at, end)) {
    const i = at >>> 3;
    at = (i + 1) * 8;
    // Two 32-bit halves per entry (a BigInt per entry cost ~1.5 ms for a 4 TiB image's table).
    const hi = dv.getUint32(i * 8);
    const lo = dv.getUint32(i * 8 + 4);
    // `unalignedLater`: as QEMU, an image opens with such an entry, the reserved bits ignored and
    // the block refused (unaligned) or read as zeros (past the file) when a request needs it
    // (alloc.ts), so the rest of the image stays usable.
    const lenient = options.unalignedLater === true;
    if ((lo & 0x1ff) !== 0 && !lenient) throw corrupt(`refcount table entry ${i} (0x${hex64(hi, lo)}) has reserved bits set`);
    if (hi > 0x1fffff && !lenient) throw corrupt(`refcount table entry ${i} (0x${hex64(hi, lo)}) is too large`);
    // (Past 2^53 the offset may be rounded: it lies far beyond any file either way.)
    // (`lo - (lo & 0x1ff)`, not `lo & ~0x1ff`: a bitwise result is a signed 32-bit number, and a
    // block at 2 GiB, 6 GiB, ... would come out 4 GiB too low, over the image's data.)
    const n = hi * 2 ** 32 + (lenient ? lo - (lo & 0x1ff) : lo);
    if (n % clusterSize !== 0 && !lenient) throw corrupt(`refcount block offset 0x${n.toString(16)} (table entry ${i}) is not cluster aligned`);
    out[i] = n;
  }
  return out;
}

/** A 64-bit value from its two halves, in hex (for error messages). */
const hex64 = (hi: number, lo: number): string => ((BigInt(hi) << 32n) | BigInt(lo)).toString(16);

/** Encode refcount table entries into `buf` (which may be longer: the rest stays as it is). */
export function encodeRefcountTable(offsets: readonly number[], buf: Uint8Array = new Uint8Array(offsets.length * 8)): Uint8Array {
  const dv = view(buf);
  for (let i = 0; i < offsets.length; i++) dv.setBigUint64(i * 8, BigInt(offsets[i]!));
  return buf;
}
