/**
 * Bitmap tables: one u64 per cluster of bitmap data. Bits 9-55 give the data cluster; when they
 * are zero, bit 0 says whether that whole stretch of the bitmap is all zeros (0) or all ones (1).
 * Every other bit is reserved and must be zero. Pure codec, no I/O.
 *
 * In memory a table is a Float64Array of ALL_ZERO, ALL_ONE or a host offset (offsets are cluster
 * aligned and at least one cluster, so they never collide with 0 and 1).
 */
import { setU64, u64big } from '../../../core/bytes.js';
import { corrupt } from '../../../core/errors.js';

export const ALL_ZERO = 0;
export const ALL_ONE = 1;
const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
const RESERVED_MASK = 0xff00_0000_0000_01fen;

export function decodeTable(buf: Uint8Array, clusterSize: number, fileSize: number, name: string): Float64Array {
  const n = buf.length / 8;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const v = u64big(buf, i * 8);
    if (v & RESERVED_MASK) throw corrupt(`bitmap '${name}': table entry ${i} has reserved bits set`);
    const off = Number(v & OFFSET_MASK);
    if (off === 0) {
      out[i] = Number(v & 1n);
      continue;
    }
    if (v & 1n) throw corrupt(`bitmap '${name}': table entry ${i} has both an offset and the all-ones flag`);
    if (off % clusterSize !== 0 || off + clusterSize > fileSize) throw corrupt(`bitmap '${name}': table entry ${i} points outside the image (0x${off.toString(16)})`);
    out[i] = off;
  }
  return out;
}

export function encodeTable(table: Float64Array): Uint8Array {
  const out = new Uint8Array(table.length * 8);
  for (let i = 0; i < table.length; i++) setU64(out, i * 8, table[i]!);
  return out;
}

/** The host offsets of the data clusters a table references. */
export function dataClusters(table: Float64Array): number[] {
  const out: number[] = [];
  for (const v of table) if (v > ALL_ONE) out.push(v);
  return out;
}
