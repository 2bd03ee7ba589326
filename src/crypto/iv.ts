/**
 * Per-sector IVs as dm-crypt/QEMU name them. Every generator returns 16 bytes per sector, for
 * `count` consecutive sectors starting at `firstSector`.
 */
import { invalidArgument } from '../core/errors.js';

const IV_LENGTH = 16;

/** Throws unless sectors firstSector .. firstSector + count are non-negative safe integers. */
export function checkSector(firstSector: number, count: number): void {
  if (!Number.isSafeInteger(firstSector) || firstSector < 0 || !Number.isSafeInteger(firstSector + count)) {
    throw invalidArgument(`sector number ${firstSector} is not a non-negative safe integer`);
  }
}

/** "plain64": the sector number as a little-endian u64, then 8 zero bytes. */
export function plain64Ivs(firstSector: number, count: number): Uint8Array {
  checkSector(firstSector, count);
  const out = new Uint8Array(count * IV_LENGTH);
  const v = new DataView(out.buffer);
  let s = BigInt(firstSector);
  for (let i = 0; i < count; i++, s++) v.setBigUint64(i * IV_LENGTH, s, true);
  return out;
}

/** "plain": like plain64 but the sector number is cut to 32 bits (old dm-crypt behaviour). */
export function plainIvs(firstSector: number, count: number): Uint8Array {
  checkSector(firstSector, count);
  const out = new Uint8Array(count * IV_LENGTH);
  const v = new DataView(out.buffer);
  for (let i = 0; i < count; i++) v.setUint32(i * IV_LENGTH, (firstSector + i) % 0x1_0000_0000, true);
  return out;
}
