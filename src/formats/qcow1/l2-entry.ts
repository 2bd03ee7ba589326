/**
 * One L2 entry (u64, big-endian): where a guest cluster's bytes are.
 *   0                 unallocated: the backing image (or zeros) decides
 *   bit 63 clear      a normal cluster at that host byte offset (QEMU needs it 512-aligned)
 *   bit 63 set        a compressed cluster: bits (63-cb)..62 hold the exact compressed length in
 *                     bytes and bits 0..(62-cb) its host byte offset (any alignment)
 * where cb is cluster_bits. There are no other flags in qcow v1 (no zero or COPIED bits).
 */
import { corrupt } from '../../core/errors.js';

export const COMPRESSED_FLAG = 1n << 63n;

export type ClusterEntry =
  | { kind: 'unallocated' }
  | { kind: 'normal'; hostOffset: number }
  | { kind: 'compressed'; hostOffset: number; compressedSize: number; raw: bigint };

const UNALLOCATED: ClusterEntry = { kind: 'unallocated' };

/** Decode an entry; offsets that are not exact numbers or not usable are reported as corrupt. */
export function decodeEntry(entry: bigint, clusterBits: number): ClusterEntry {
  if (entry === 0n) return UNALLOCATED;
  if ((entry & COMPRESSED_FLAG) === 0n) {
    if (entry > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`L2 entry 0x${entry.toString(16)}: cluster offset is too large`);
    const hostOffset = Number(entry);
    // QEMU fails such reads with EIO: data is read in whole 512-byte sectors.
    if (hostOffset % 512 !== 0) throw corrupt(`L2 entry 0x${entry.toString(16)}: cluster offset is not a multiple of 512`);
    return { kind: 'normal', hostOffset };
  }
  const sizeShift = BigInt(63 - clusterBits);
  const compressedSize = Number((entry >> sizeShift) & ((1n << BigInt(clusterBits)) - 1n));
  const offset = entry & ((1n << sizeShift) - 1n);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`L2 entry 0x${entry.toString(16)}: compressed cluster offset is too large`);
  if (compressedSize === 0) throw corrupt(`L2 entry 0x${entry.toString(16)}: compressed cluster has length 0`);
  return { kind: 'compressed', hostOffset: Number(offset), compressedSize, raw: entry };
}

export function normalEntry(hostOffset: number): bigint {
  return BigInt(hostOffset);
}

/** A compressed descriptor; the length must be below the cluster size (it has cluster_bits bits). */
export function compressedEntry(hostOffset: number, compressedSize: number, clusterBits: number): bigint {
  const sizeShift = BigInt(63 - clusterBits);
  if (compressedSize <= 0 || compressedSize >= 2 ** clusterBits) throw new RangeError(`compressed length ${compressedSize} does not fit`);
  if (BigInt(hostOffset) >= 1n << sizeShift) throw new RangeError(`compressed cluster offset ${hostOffset} does not fit`);
  return COMPRESSED_FLAG | (BigInt(compressedSize) << sizeShift) | BigInt(hostOffset);
}
