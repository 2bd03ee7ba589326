/**
 * Big-endian field access on Uint8Array, and 64-bit values that must fit in a JS number.
 * Every on-disk format here is big-endian; offsets above 2^53 cannot be exact in a number, so
 * 64-bit fields are read as BigInt and checked before they become numbers.
 */
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

/** True when every byte of `b` is zero. Checks 8 bytes at a time where the buffer is aligned. */
export function isZero(b: Uint8Array): boolean {
  const n = b.byteLength;
  let i = 0;
  if ((b.byteOffset & 7) === 0 && n >= 64) {
    const words = new BigUint64Array(b.buffer, b.byteOffset, n >>> 3);
    for (const w of words) if (w !== 0n) return false;
    i = words.length << 3;
  }
  for (; i < n; i++) if (b[i] !== 0) return false;
  return true;
}

export const ascii = (b: Uint8Array): string => new TextDecoder('latin1').decode(b);
export const utf8 = (b: Uint8Array): string => new TextDecoder().decode(b);
export const encodeUtf8 = (s: string): Uint8Array => new TextEncoder().encode(s);

export const alignUp = (v: number, a: number): number => Math.ceil(v / a) * a;
export const alignDown = (v: number, a: number): number => Math.floor(v / a) * a;
export const isPowerOfTwo = (v: number): boolean => Number.isSafeInteger(v) && v > 0 && Number.isInteger(Math.log2(v));

/** Fail unless offset+length is a safe integer range inside [0, limit]. */
export function checkRange(offset: number, length: number, limit: number, what: string): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > limit) {
    throw corrupt(`${what} [0x${offset.toString(16)}, +0x${length.toString(16)}) is outside 0..0x${limit.toString(16)}`);
  }
}
