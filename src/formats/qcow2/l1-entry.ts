/**
 * L1 table entries (8 bytes, big-endian), decoded and encoded here and nowhere else:
 *   bit 63      COPIED: the L2 table's refcount is exactly 1 (kept in the active L1 only);
 *   bits 9..55  the L2 table's host offset (cluster aligned);
 *   every other bit is reserved.
 * The L1 table is held as its raw bytes; these functions read and write one entry in place. Hot
 * readers decode two signed 32-bit words (no BigInt, no DataView): they run for every request.
 */
import { corrupt } from '../../core/errors.js';
import { entryOffset } from './layout.js';

/** Bits 9..55: the L2 table's host offset. */
export const L1_OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
/** Bit 63: the L2 table is referenced once (it may be written in place). */
export const L1_COPIED = 1n << 63n;
const COPIED_HI = 0x80000000;

const word = (b: Uint8Array, at: number): number => (b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!;

/**
 * Host offset of the L2 table that entry `i` names, 0 for none. Offsets at or past 2^53 throw
 * (corrupt); alignment is the caller's to judge (its message names the entry's use).
 */
export function l1TableOffset(l1: Uint8Array, i: number): number {
  return entryOffset(word(l1, i * 8), word(l1, i * 8 + 4), 'L1 entry');
}

/** Entry `i` names no L2 table (offset bits all zero; flag bits alone name nothing). Never throws. */
export function l1EntryEmpty(l1: Uint8Array, i: number): boolean {
  const b = i * 8;
  return (l1[b + 1]! | l1[b + 2]! | l1[b + 3]! | l1[b + 4]! | l1[b + 5]! | (l1[b + 6]! & 0xfe)) === 0;
}

/** Entry `i` has COPIED set. */
export function l1EntryCopied(l1: Uint8Array, i: number): boolean {
  return (word(l1, i * 8) & COPIED_HI) !== 0;
}

/** Entry `i` as one 64-bit value (for tools that carry entries whole: snapshots, amend). */
export function l1EntryRaw(l1: Uint8Array, i: number): bigint {
  return new DataView(l1.buffer, l1.byteOffset + i * 8, 8).getBigUint64(0);
}

/** Make entry `i` name the L2 table at `offset` (0: none), COPIED as given. */
export function setL1Entry(l1: Uint8Array, i: number, offset: number, copied: boolean): void {
  if (offset % 512 !== 0 || !Number.isSafeInteger(offset) || offset < 0) throw corrupt(`L1 entry ${i}: invalid L2 table offset ${offset}`);
  const v = (copied && offset !== 0 ? L1_COPIED : 0n) | BigInt(offset);
  new DataView(l1.buffer, l1.byteOffset + i * 8, 8).setBigUint64(0, v);
}

/** Set or clear COPIED on entry `i`, keeping the rest of it. */
export function setL1Copied(l1: Uint8Array, i: number, copied: boolean): void {
  const b = i * 8;
  l1[b] = copied ? l1[b]! | 0x80 : l1[b]! & 0x7f;
}
