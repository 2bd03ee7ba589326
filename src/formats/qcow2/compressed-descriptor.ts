/**
 * Compressed cluster descriptors: an L2 entry with bit 62 (COMPRESSED) set. Decoded and encoded
 * here and nowhere else. With x = 62 - (cluster_bits - 8):
 *   bits 0..x-1   the host byte offset of the compressed stream (any byte, not aligned);
 *   bits x..61    how many 512-byte sectors the stream touches beyond its first one;
 *   bit 62        COMPRESSED; bit 63 (COPIED) is never set on a compressed entry.
 * The sector count gives an upper bound of the stream's length; readers read up to that bound.
 */
import { corrupt } from '../../core/errors.js';

/** Bit 62 of an L2 entry: the entry is a compressed descriptor. */
export const L2_COMPRESSED = 1n << 62n;
/** The same bit in the entry's high 32-bit word. */
export const COMPRESSED_BIT_HI = 0x40000000;

const hex = (hi: number, lo: number) => (hi >>> 0).toString(16).padStart(8, '0') + (lo >>> 0).toString(16).padStart(8, '0');

/** Decode the descriptor whose high and low big-endian words are `hi` and `lo`. */
export function compressedDescriptor(hi: number, lo: number, clusterBits: number): { hostOffset: number; bound: number } {
  // x is 49..61 for cluster_bits 9..21: the offset's top x - 32 bits and the sector count are both
  // in the high word, so 32-bit arithmetic on the two halves does it (BigInt cost ~1 us a call).
  const highBits = 62 - (clusterBits - 8) - 32;
  const hiOffset = (hi & 0x3fffffff & ((1 << highBits) - 1)) >>> 0;
  const nsec = ((hi & 0x3fffffff) >>> highBits) + 1;
  // hiOffset * 2^32 must stay below 2^53 for the offset to be an exact number.
  if (hiOffset >= 0x200000) throw corrupt(`compressed cluster descriptor 0x${hex(hi, lo)}: offset is too large`);
  const hostOffset = hiOffset * 0x100000000 + (lo >>> 0);
  if (hostOffset > Number.MAX_SAFE_INTEGER - nsec * 512) throw corrupt(`compressed cluster descriptor 0x${hex(hi, lo)}: offset is too large`);
  return { hostOffset, bound: nsec * 512 - (hostOffset % 512) };
}

/** The L2 entry (COMPRESSED set) for a stream of `length` bytes at host byte `hostOffset`. */
export function encodeCompressedDescriptor(hostOffset: number, length: number, clusterBits: number): bigint {
  const x = 62 - (clusterBits - 8);
  const extraSectors = Math.floor((hostOffset + length - 1) / 512) - Math.floor(hostOffset / 512);
  if (length <= 0 || extraSectors >= 2 ** (clusterBits - 8) || hostOffset >= 2 ** x) {
    throw corrupt(`compressed cluster of ${length} bytes at 0x${hostOffset.toString(16)} does not fit a descriptor`);
  }
  return L2_COMPRESSED | (BigInt(extraSectors) << BigInt(x)) | BigInt(hostOffset);
}
