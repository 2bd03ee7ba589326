/**
 * Big-endian field access on Uint8Array, and 64-bit values that must fit in a JS number.
 * Every on-disk format here is big-endian; offsets above 2^53 cannot be exact in a number, so
 * 64-bit fields are read as BigInt and checked before they become numbers.
 */
import { nativeBlockRunEnd } from '#host-copy';
import { corrupt } from './errors.js';

export const view = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength);

export const u8 = (b: Uint8Array, off: number): number => b[off]!;
// Fields are read and written byte by byte rather than through a DataView made per call: the
// table walks call these for every entry, and each view was garbage. Out-of-range offsets still
// throw RangeError, as DataView did, so a short buffer never reads as zeros.
export function u16(b: Uint8Array, off: number): number {
  inBounds(b, off, 2);
  return (b[off]! << 8) | b[off + 1]!;
}
export function u32(b: Uint8Array, off: number): number {
  inBounds(b, off, 4);
  return ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
}
export const u64big = (b: Uint8Array, off: number): bigint => view(b).getBigUint64(off);

/** A u64 field as a number; throws QCOW_CORRUPT naming the field if it is not exact. */
export function u64(b: Uint8Array, off: number, field = 'field'): number {
  const hi = u32(b, off);
  const lo = u32(b, off + 4);
  if (hi >= 0x200000) throw corrupt(`${field} 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is too large`);
  return hi * 0x100000000 + lo;
}

/**
 * Byte counts a Number holds exactly: every integer up to 2^53, and past it every multiple of 512
 * below 2^62 (a double's spacing there is at most 512). Virtual sizes are whole 512-byte sectors,
 * so every size QEMU's formats can describe (qcow2's largest L1 table reaches 2^61) is exact as a
 * number; only arithmetic on byte offsets past 2^53 is not, and requests there are refused.
 */
export const EXACT_SECTOR_LIMIT = 2 ** 62;

/**
 * Whether `n` can be a byte count as QEMU takes one (below 2^63): any safe integer, and past 2^53
 * whole sectors (see EXACT_SECTOR_LIMIT; from 2^62 on, every integral double is a multiple of 1024).
 * That a number came out of a text exactly is for the parser to check (core/size.ts does).
 */
export function isExactByteCount(n: number): boolean {
  return Number.isSafeInteger(n) ? n >= 0 : Number.isInteger(n) && n > 0 && n < 2 ** 63 && n % 512 === 0;
}

/** A byte count in decimal, exactly (String(2 ** 55) would print the shortest double, ...970). */
export function byteCountText(n: number): string {
  return Number.isSafeInteger(n) ? String(n) : BigInt(n).toString();
}

/**
 * A u64 virtual size as a number: exact below 2^53; past it in whole sectors (rounded down, as
 * QEMU counts a disk in sectors) while that stays exact; throws QCOW_CORRUPT naming the field
 * beyond.
 */
export function u64Size(b: Uint8Array, off: number, field = 'size'): number {
  const v = u64big(b, off);
  if (v <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(v);
  if (v >= BigInt(EXACT_SECTOR_LIMIT)) throw corrupt(`${field} 0x${v.toString(16)} is too large`);
  return Number(v - (v % 512n));
}

export function setU16(b: Uint8Array, off: number, v: number): void {
  inBounds(b, off, 2);
  b[off] = v >>> 8;
  b[off + 1] = v;
}
export function setU32(b: Uint8Array, off: number, v: number): void {
  inBounds(b, off, 4);
  b[off] = v >>> 24;
  b[off + 1] = v >>> 16;
  b[off + 2] = v >>> 8;
  b[off + 3] = v;
}
export function setU64(b: Uint8Array, off: number, v: number | bigint): void {
  if (typeof v === 'bigint' || !Number.isSafeInteger(v) || v < 0) {
    view(b).setBigUint64(off, typeof v === 'bigint' ? v : BigInt(v));
    return;
  }
  setU32(b, off, Math.floor(v / 0x100000000));
  setU32(b, off + 4, v % 0x100000000);
}

function inBounds(b: Uint8Array, off: number, size: number): void {
  if (!(off >= 0 && off + size <= b.length)) throw new RangeError(`Offset ${off} is outside the bounds of the buffer`);
}

/** True when every byte of `b` is zero. */
export const isZero = (b: Uint8Array): boolean => firstNonZero(b) === b.length;

/**
 * Index of the first non-zero byte of b[start, end), or `end` when there is none. Tables of a
 * sparse image are mostly zeros and are walked on every open or block-status call, often before
 * V8 has compiled this: so it reads 4-byte words, four per step, to keep the iterations few
 * (BigInt-based 64-bit reads are much slower in V8).
 */
export function firstNonZero(b: Uint8Array, start = 0, end = b.length): number {
  // With the host addon, a long scan is one native call: the words below run mostly in V8's
  // baseline code in a short process, at ~150 instructions a word. The L2 tables of a chain's
  // upper layers (1 MiB written every 8 MiB) are mostly zero entries, and their block status
  // spent ~14 M instructions here for 344 KB of entries (callgrind, 3-layer chain -> raw).
  if (end - start >= NATIVE_SCAN_MIN) {
    const scan = nativeBlockRunEnd();
    if (scan && start >= 0 && end <= b.length) {
      // The end of the run of zero 8-byte blocks from `start`, then the byte inside that block.
      let i = scan(b, start, end, 8, true);
      while (i < end && b[i] === 0) i++;
      return i;
    }
  }
  return firstNonZeroJs(b, start, end);
}

/** Below this many bytes the JavaScript loop costs less than the call into the addon. */
const NATIVE_SCAN_MIN = 256;

/** {@link firstNonZero} in JavaScript: without the host addon, in browsers, and for short ranges. */
export function firstNonZeroJs(b: Uint8Array, start = 0, end = b.length): number {
  let i = start;
  // Bytes up to the first 4-byte aligned address, then words.
  const headEnd = Math.min(end, start + ((4 - ((b.byteOffset + start) % 4)) % 4));
  for (; i < headEnd; i++) if (b[i] !== 0) return i;
  if (end - i >= 32) {
    const words = new Uint32Array(b.buffer, b.byteOffset + i, (end - i) >>> 2);
    const n = words.length;
    let j = 0;
    for (; j + 4 <= n; j += 4) if ((words[j]! | words[j + 1]! | words[j + 2]! | words[j + 3]!) !== 0) break;
    while (j < n && words[j] === 0) j++;
    i += j << 2;
  }
  for (; i < end; i++) if (b[i] !== 0) return i;
  return end;
}

// One decoder (encoder) each, made at first use: decode() without { stream } keeps no state
// between calls, and making one cost ~12 us, paid per name of a header's feature-name table
// (a dozen in every image qemu makes) and of its snapshot table at every open.
let latin1Decoder: TextDecoder | undefined;
let utf8Decoder: TextDecoder | undefined;
let utf8Encoder: TextEncoder | undefined;
export const ascii = (b: Uint8Array): string => (latin1Decoder ??= new TextDecoder('latin1')).decode(b);
export const utf8 = (b: Uint8Array): string => (utf8Decoder ??= new TextDecoder()).decode(b);
export const encodeUtf8 = (s: string): Uint8Array => (utf8Encoder ??= new TextEncoder()).encode(s);

export const alignUp = (v: number, a: number): number => Math.ceil(v / a) * a;
export const alignDown = (v: number, a: number): number => Math.floor(v / a) * a;
export const isPowerOfTwo = (v: number): boolean => Number.isSafeInteger(v) && v > 0 && Number.isInteger(Math.log2(v));

/** Fail unless offset+length is a safe integer range inside [0, limit]. */
export function checkRange(offset: number, length: number, limit: number, what: string): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > limit) {
    throw corrupt(`${what} [0x${offset.toString(16)}, +0x${length.toString(16)}) is outside 0..0x${limit.toString(16)}`);
  }
}
