/**
 * L2 entries as pure data: decode one entry of an L2 table (standard 8-byte or extended 16-byte)
 * into a `ClusterDescriptor`, and ask what one subcluster of it holds. No I/O here.
 *
 * API (the writer reuses it):
 *   - `readL2Entry(table, index, ctx)` -> ClusterDescriptor
 *   - `subclusterKind(desc, i)` -> SubclusterKind (i = 0 without extended L2)
 *   - `compressedDescriptor(hi, lo, clusterBits)` -> { hostOffset, bound }
 *
 * Kinds follow qemu's names: ZERO_PLAIN is "reads zeros, no host cluster", ZERO_ALLOC "reads
 * zeros, host cluster kept", UNALLOCATED_ALLOC (extended L2 only) "host cluster allocated but this
 * subcluster falls through to the backing file".
 */
import { corrupt } from '../../core/errors.js';
import { entryOffset } from './layout.js';

export type SubclusterKind = 'unallocated' | 'unallocated-alloc' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';

export interface L2Context {
  clusterBits: number;
  extendedL2: boolean;
  /** An external data file: host offset 0 is a real offset there, told apart by the COPIED bit. */
  externalDataFile: boolean;
}

export interface ClusterDescriptor {
  /** The standard entry's kind; with extended L2, per-subcluster kinds come from the bitmap. */
  kind: 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';
  /** Host byte offset: the cluster (normal / zero-alloc) or the compressed stream (any byte). */
  hostOffset: number;
  /** Compressed only: bytes to read from hostOffset (an upper bound of the stream's length). */
  compressedBound: number;
  /** Extended L2 only: bits 0-31 allocated, 32-63 reads-as-zero, as two numbers. */
  allocBitmap: number;
  zeroBitmap: number;
  /** The raw entry halves as signed 32-bit words (`>>> 0` for the unsigned value), for writers
   *  that need the flags (COPIED etc.). */
  hi: number;
  lo: number;
}

const COMPRESSED_BIT_HI = 0x40000000;
const COPIED_BIT_HI = 0x80000000;

export function readL2Entry(table: Uint8Array, index: number, ctx: L2Context): ClusterDescriptor {
  return decodeL2Entry(table, index, ctx, { kind: 'unallocated', hostOffset: 0, compressedBound: 0, allocBitmap: 0, zeroBitmap: 0, hi: 0, lo: 0 });
}

/**
 * readL2Entry into a descriptor the caller owns and reuses: walks over every entry of an image
 * (check) would otherwise make ~90 bytes of garbage per cluster.
 */
export function decodeL2Entry(table: Uint8Array, index: number, ctx: L2Context, desc: ClusterDescriptor): ClusterDescriptor {
  // Plain byte reads, no DataView or BigInt: readers decode an entry for every cluster they touch
  // (an NBD read of 1 GiB decodes 16384), and a view per entry was garbage for the collector.
  const o = index * (ctx.extendedL2 ? 16 : 8);
  const hi = s32(table, o);
  const lo = s32(table, o + 4);
  desc.kind = 'unallocated';
  desc.hostOffset = 0;
  desc.compressedBound = 0;
  desc.allocBitmap = 0;
  desc.zeroBitmap = 0;
  desc.hi = hi;
  desc.lo = lo;
  if (ctx.extendedL2) {
    // Bitmap word: high half = zero bits (32..63), low half = allocated bits (0..31).
    desc.zeroBitmap = s32(table, o + 8);
    desc.allocBitmap = s32(table, o + 12);
  }
  // The compressed flag comes first: bit 0 of a compressed descriptor is part of its offset.
  if (hi & COMPRESSED_BIT_HI) {
    const c = compressedDescriptor(hi, lo, ctx.clusterBits);
    desc.kind = 'compressed';
    desc.hostOffset = c.hostOffset;
    desc.compressedBound = c.bound;
    return desc;
  }
  const host = entryOffset(hi, lo, 'L2 entry');
  if (host % (1 << ctx.clusterBits) !== 0) throw corrupt(`L2 entry 0x${hex(hi, lo)}: cluster offset 0x${host.toString(16)} is not cluster aligned`);
  const hasHost = host !== 0 || (ctx.externalDataFile && (hi & COPIED_BIT_HI) !== 0);
  desc.hostOffset = host;
  if (!ctx.extendedL2 && lo & 1) desc.kind = host !== 0 ? 'zero-alloc' : 'zero-plain';
  else desc.kind = hasHost ? 'normal' : 'unallocated';
  return desc;
}

/**
 * The end (exclusive index) of the run of standard (8-byte) entries from `index` that continue
 * entry `index` cluster by cluster: each is the one before plus `clusterSize` in host offset, with
 * the same flags, so each decodes as entry `index` does, one cluster further on. At most `max`
 * entries. Readers (map, reads) and check take such a run in one step instead of decoding each.
 */
export function contiguousEntries(t: Uint8Array, index: number, max: number, clusterSize: number): number {
  // Signed 32-bit words throughout: an unsigned word above 2^31 is a heap-allocated number until
  // V8 optimises the loop, which in a short process it mostly never does (a `map` of a 1 GiB
  // image with 4 KiB clusters made ~16 MB of garbage here: 7 ms of collection).
  const b = index * 8;
  let wantHi = (t[b]! << 24) | (t[b + 1]! << 16) | (t[b + 2]! << 8) | t[b + 3]!;
  let wantLo = (t[b + 4]! << 24) | (t[b + 5]! << 16) | (t[b + 6]! << 8) | t[b + 7]!;
  let k = 1;
  for (; k < max; k++) {
    // The previous entry's offset plus one cluster, the carry taken into the high word: the low
    // word wrapped past 2^32 exactly when it goes from "negative" to not.
    const next = (wantLo + clusterSize) | 0;
    if (wantLo < 0 && next >= 0) wantHi = (wantHi + 1) | 0;
    wantLo = next;
    const e = b + k * 8;
    if (((t[e + 4]! << 24) | (t[e + 5]! << 16) | (t[e + 6]! << 8) | t[e + 7]!) !== wantLo) break;
    if (((t[e]! << 24) | (t[e + 1]! << 16) | (t[e + 2]! << 8) | t[e + 3]!) !== wantHi) break;
  }
  return index + k;
}

/** What subcluster `i` (0..31; always 0 without extended L2) of a cluster reads from. */
export function subclusterKind(d: ClusterDescriptor, i: number, extendedL2: boolean): SubclusterKind {
  if (!extendedL2 || d.kind === 'compressed') return d.kind;
  const alloc = (d.allocBitmap >>> i) & 1;
  const zero = (d.zeroBitmap >>> i) & 1;
  if (alloc && zero) throw corrupt(`extended L2 entry: subcluster ${i} is marked both allocated and zero`);
  if (d.kind === 'normal') return alloc ? 'normal' : zero ? 'zero-alloc' : 'unallocated-alloc';
  if (alloc) throw corrupt(`extended L2 entry: subcluster ${i} is allocated but the cluster has no host offset`);
  return zero ? 'zero-plain' : 'unallocated';
}

/**
 * A compressed descriptor (bits 0..61): the low x = 62 - (cluster_bits - 8) bits are the host byte
 * offset, the next cluster_bits - 8 bits the number of 512-byte sectors beyond the first.
 */
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

/**
 * Big-endian 32-bit word at `at`, signed: every entry decodes one or more, and an unsigned word of
 * 2^31 or more (any entry with COPIED set) is a heap-allocated number wherever V8 has not yet
 * optimised the caller, which in a short-lived command is most places.
 */
function s32(b: Uint8Array, at: number): number {
  return (b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!;
}

const hex = (hi: number, lo: number) => (hi >>> 0).toString(16).padStart(8, '0') + (lo >>> 0).toString(16).padStart(8, '0');
