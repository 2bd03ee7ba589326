/**
 * QCOW2 geometry: how a guest offset splits into L1 index, L2 index and offset in cluster, how big
 * L2 entries and tables are, and the masks for host offsets in table entries.
 *
 * Stable API (the qcow2 writer imports it):
 *   - `qcow2Geometry(clusterBits, extendedL2)` -> `Qcow2Geometry` (all plain numbers).
 *   - `l1EntriesFor(size, geometry)`: L1 entries needed for a virtual size.
 *   - `MAX_L1_BYTES`, `MAX_REFCOUNT_TABLE_BYTES`, `MAX_SNAPSHOTS`: qemu's implementation limits.
 *   - `entryOffset(hi, lo)`: the host offset field (bits 9-55) that L1 and standard L2 entries
 *     share, given as two big-endian u32 halves. Each entry's full layout (flags, encoding) lives
 *     in its own module: l1-entry.ts, l2-entry.ts, compressed-descriptor.ts.
 */
import { corrupt } from '../../core/errors.js';

/** qemu refuses L1 tables above 32 MiB and refcount tables above 8 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_L1_ENTRIES = MAX_L1_BYTES / 8;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;

export interface Qcow2Geometry {
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  /** 8, or 16 with extended L2 (entry + subcluster bitmap). */
  l2EntryBytes: number;
  /** Entries in one L2 table (one cluster). */
  l2Entries: number;
  /** log2(l2Entries). */
  l2Bits: number;
  /** Guest bytes one L2 table maps. */
  l2Coverage: number;
  /** 32 with extended L2, else 1. */
  subclustersPerCluster: number;
  subclusterSize: number;
  subclusterBits: number;
}

export function qcow2Geometry(clusterBits: number, extendedL2: boolean): Qcow2Geometry {
  const clusterSize = 2 ** clusterBits;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const l2Bits = clusterBits - (extendedL2 ? 4 : 3);
  const subclustersPerCluster = extendedL2 ? 32 : 1;
  const subclusterBits = clusterBits - (extendedL2 ? 5 : 0);
  return {
    clusterBits,
    clusterSize,
    extendedL2,
    l2EntryBytes,
    l2Entries: 2 ** l2Bits,
    l2Bits,
    l2Coverage: 2 ** (l2Bits + clusterBits),
    subclustersPerCluster,
    subclusterSize: 2 ** subclusterBits,
    subclusterBits,
  };
}

export function l1EntriesFor(size: number, g: Qcow2Geometry): number {
  return Math.ceil(size / g.l2Coverage);
}

const TWO_32 = 2 ** 32;

/**
 * Host offset bits 9..55 of an entry given as its high and low big-endian u32 halves. Offsets at
 * or above 2^53 cannot be exact numbers (nor real files): they are reported as corrupt.
 */
export function entryOffset(hi: number, lo: number, what = 'table entry'): number {
  const high = hi & 0x00ffffff;
  if (high >= 2 ** 21) throw corrupt(`${what}: host offset is beyond 2^53`);
  // Below 4 GiB without the multiply: a small integer stays one (no heap number per entry
  // while the caller runs unoptimised).
  if (high === 0) return (lo & 0xfffffe00) >>> 0;
  return high * TWO_32 + ((lo & 0xfffffe00) >>> 0);
}
