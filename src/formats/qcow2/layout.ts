/**
 * QCOW2 geometry: how a guest offset splits into L1 index, L2 index and offset in cluster, how big
 * L2 entries and tables are, and the masks for host offsets in table entries.
 *
 * Stable API (the qcow2 writer imports it):
 *   - `qcow2Geometry(clusterBits, extendedL2)` -> `Qcow2Geometry` (all plain numbers).
 *   - `l1EntriesFor(size, geometry)`: L1 entries needed for a virtual size.
 *   - `MAX_L1_BYTES`, `MAX_REFCOUNT_TABLE_BYTES`, `MAX_SNAPSHOTS`: qemu's implementation limits.
 *   - `entryOffset(hi, lo)`: host offset (bits 9-55) of an L1/L2/refcount entry given as two
 *     big-endian u32 halves; `ENTRY_OFFSET_MASK` as a bigint for writers who work in bigint.
 */
import { corrupt } from '../../core/errors.js';

/** Bits 9..55 of an L1 or standard L2 entry: the host offset. */
export const ENTRY_OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
/** Bit 63 of L1/L2 entries: refcount is exactly 1 (only maintained in the active tables). */
export const ENTRY_COPIED = 1n << 63n;
/** Bit 62 of L2 entries. */
export const ENTRY_COMPRESSED = 1n << 62n;
/** Bit 0 of a standard L2 entry (v3, not with extended L2): the cluster reads as zeros. */
export const ENTRY_ZERO = 1n;

/** qemu refuses L1 tables above 32 MiB and refcount tables above 8 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
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
