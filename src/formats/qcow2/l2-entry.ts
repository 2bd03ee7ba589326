/**
 * L2 entries, standard (8 bytes) and extended (16: the entry, then a subcluster bitmap), decoded
 * and encoded here and nowhere else; compressed descriptors have their own module
 * (compressed-descriptor.ts). No I/O here. The standard entry:
 *   bit 63      COPIED: the cluster's refcount is exactly 1 (kept in the active tables only);
 *   bit 62      COMPRESSED (then bits 0..61 are a compressed descriptor);
 *   bits 9..55  the host cluster offset;
 *   bit 0       ZERO: reads as zeros (v3, standard entries only; extended entries use the bitmap).
 * The extended bitmap word: bits 0..31 "subcluster allocated", bits 32..63 "subcluster reads zero".
 *
 * Decoding: `readL2Entry` / `decodeL2Entry` -> ClusterDescriptor, `subclusterKind(desc, i)`.
 * Encoding: `standardL2Entry`, `setL2Entry`, `setCopiedNormalEntry` (the hot write path),
 * `setZeroPlainEntry`, `setL2Copied`; `l2EntryBitmap` gives a descriptor's bitmap back as one word.
 *
 * Kinds follow qemu's names: ZERO_PLAIN is "reads zeros, no host cluster", ZERO_ALLOC "reads
 * zeros, host cluster kept", UNALLOCATED_ALLOC (extended L2 only) "host cluster allocated but this
 * subcluster falls through to the backing file".
 */
import { nativeContiguousEntries } from '#host-copy';
import { corrupt } from '../../core/errors.js';
import { setU32, u32 } from '../../core/bytes.js';
import { entryOffset } from './layout.js';
import { COMPRESSED_BIT_HI, compressedDescriptor } from './compressed-descriptor.js';

/** Bits 9..55 of a standard entry: the host cluster offset. */
export const L2_OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
/** Bit 63: the cluster is referenced once (it may be written in place). */
export const L2_COPIED = 1n << 63n;
/** Bit 0 of a standard entry (v3): the cluster reads as zeros. */
export const L2_ZERO = 1n;
/** Every subcluster's bit in one half of the extended bitmap word. */
export const ALL_SUBCLUSTERS = 0xffff_ffffn;
/** Extended bitmap: every subcluster reads as zeros, none allocated. */
export const ALL_SUBCLUSTERS_ZERO = ALL_SUBCLUSTERS << 32n;

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

const COPIED_BIT_HI = 0x80000000;

export function readL2Entry(table: Uint8Array, index: number, ctx: L2Context, lenient = false): ClusterDescriptor {
  return decodeL2Entry(table, index, ctx, { kind: 'unallocated', hostOffset: 0, compressedBound: 0, allocBitmap: 0, zeroBitmap: 0, hi: 0, lo: 0 }, lenient);
}

/**
 * readL2Entry into a descriptor the caller owns and reuses: walks over every entry of an image
 * (check) would otherwise make ~90 bytes of garbage per cluster. `lenient`: a host offset that is
 * not cluster aligned is decoded as it stands, for the caller to signal in QEMU's words (the
 * cluster map, which knows the table and index), instead of refused here.
 */
export function decodeL2Entry(table: Uint8Array, index: number, ctx: L2Context, desc: ClusterDescriptor, lenient = false): ClusterDescriptor {
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
  if (!lenient && host % (1 << ctx.clusterBits) !== 0) throw corrupt(`L2 entry 0x${hex(hi, lo)}: cluster offset 0x${host.toString(16)} is not cluster aligned`);
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
  // With the host addon, a run of more than a few entries is one native call (~0.2 us, then ~1 ns
  // an entry). The loop below costs ~30 instructions an entry once V8 has optimised it, but a
  // short process runs most of its calls before that, in baseline code at several hundred an
  // entry: a 512 MiB copy with 4 KiB clusters spent ~29 M instructions here (callgrind).
  if (max >= NATIVE_MIN_ENTRIES) {
    const native = nativeContiguousEntries();
    // Callers may pass a fractional `max` (a range ending inside a cluster): the loop below
    // then takes the entry holding that end too, and so does the native call with its ceiling.
    const n = Math.ceil(max);
    if (native && (index + n) * 8 <= t.length) return native(t, index, n, clusterSize);
  }
  return contiguousEntriesJs(t, index, max, clusterSize);
}

/** Below this many entries the JavaScript loop costs less than the call into the addon. */
const NATIVE_MIN_ENTRIES = 8;

/** {@link contiguousEntries} in JavaScript: without the host addon, in browsers, and for short runs. */
export function contiguousEntriesJs(t: Uint8Array, index: number, max: number, clusterSize: number): number {
  // Signed 32-bit words throughout: an unsigned word above 2^31 is a heap-allocated number until
  // V8 optimises the loop, which in a short process it mostly never does (a `map` of a 1 GiB
  // image with 4 KiB clusters made ~16 MB of garbage here: 7 ms of collection).
  // Read through a DataView: optimised code loads a big-endian word at once (a load and a byte
  // swap) where four byte loads, each bounds-checked, cost ~140 instructions per entry (callgrind:
  // 36 M instructions of a 512 MiB 4 KiB-cluster convert, which compares 512 entries twice per
  // 2 MiB, in its block status and its reads).
  const v = new DataView(t.buffer, t.byteOffset, t.byteLength);
  const b = index * 8;
  let wantHi = v.getInt32(b);
  let wantLo = v.getInt32(b + 4);
  let k = 1;
  for (; k < max; k++) {
    // The previous entry's offset plus one cluster, the carry taken into the high word: the low
    // word wrapped past 2^32 exactly when it goes from "negative" to not.
    const next = (wantLo + clusterSize) | 0;
    if (wantLo < 0 && next >= 0) wantHi = (wantHi + 1) | 0;
    wantLo = next;
    const e = b + k * 8;
    if (v.getInt32(e + 4) !== wantLo || v.getInt32(e) !== wantHi) break;
  }
  return index + k;
}

/**
 * Whether an extended entry's bitmap contradicts itself, which QEMU judges for the whole entry
 * (any subcluster, not only the one asked for): a cluster with a host offset where some
 * subcluster is marked both allocated and zero, or one without a host offset where any subcluster
 * is marked allocated. Compressed entries ignore their bitmap. Always false for standard entries.
 */
export function l2EntryInvalid(d: ClusterDescriptor, extendedL2: boolean): boolean {
  if (!extendedL2 || d.kind === 'compressed') return false;
  if (d.kind === 'normal') return (d.allocBitmap & d.zeroBitmap) !== 0;
  return d.allocBitmap !== 0;
}

/** What subcluster `i` (0..31; always 0 without extended L2) of a cluster reads from. */
export function subclusterKind(d: ClusterDescriptor, i: number, extendedL2: boolean): SubclusterKind {
  if (!extendedL2 || d.kind === 'compressed') return d.kind;
  if (l2EntryInvalid(d, extendedL2)) {
    const bitmap = hex(d.zeroBitmap, d.allocBitmap);
    if (d.kind === 'normal') throw corrupt(`extended L2 entry: a subcluster is marked both allocated and zero (bitmap 0x${bitmap})`);
    throw corrupt(`extended L2 entry: a subcluster is allocated but the cluster has no host offset (bitmap 0x${bitmap})`);
  }
  const alloc = (d.allocBitmap >>> i) & 1;
  const zero = (d.zeroBitmap >>> i) & 1;
  if (d.kind === 'normal') return alloc ? 'normal' : zero ? 'zero-alloc' : 'unallocated-alloc';
  return zero ? 'zero-plain' : 'unallocated';
}

/** Bits `first`..`first + n - 1` (subcluster indexes, n >= 1, first + n <= 32) of a 32-bit half. */
export function subclusterRange(first: number, n: number): number {
  return n >= 32 ? -1 : ((((1 << n) - 1) << first) | 0);
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

/** A standard entry (the first 8 bytes of an extended one) pointing at `host` (0: none). */
export function standardL2Entry(host: number, flags: { copied?: boolean; zero?: boolean } = {}): bigint {
  if (host % 512 !== 0 || host < 0 || !Number.isSafeInteger(host)) throw corrupt(`L2 entry: invalid host cluster offset ${host}`);
  return (flags.copied ? L2_COPIED : 0n) | BigInt(host) | (flags.zero ? L2_ZERO : 0n);
}

/**
 * Write entry `index` of an L2 table whose entries are `entryBytes` long: the 64-bit entry and,
 * for extended entries when given, the subcluster bitmap word.
 */
export function setL2Entry(table: Uint8Array, index: number, entryBytes: number, entry: bigint, bitmap?: bigint): void {
  const dv = new DataView(table.buffer, table.byteOffset + index * entryBytes, entryBytes);
  dv.setBigUint64(0, entry);
  if (bitmap !== undefined && entryBytes === 16) dv.setBigUint64(8, bitmap);
}

/** Replace the subcluster bitmap of extended entry `index`, keeping the entry's first word. */
export function setL2Bitmap(table: Uint8Array, index: number, zeroBits: number, allocBits: number): void {
  setU32(table, index * 16 + 8, zeroBits >>> 0);
  setU32(table, index * 16 + 12, allocBits >>> 0);
}

/**
 * Standard entry `index` becomes COPIED | `host`, written as two words: the guest write path sets
 * one per cluster written, and a BigInt per cluster was measurable there.
 */
export function setCopiedNormalEntry(table: Uint8Array, index: number, host: number): void {
  setU32(table, index * 8, (0x80000000 | Math.floor(host / 0x100000000)) >>> 0);
  setU32(table, index * 8 + 4, host % 0x100000000);
}

/** Whether standard entry `index` is exactly what setCopiedNormalEntry(table, index, host) wrote. */
export function isCopiedNormalEntry(table: Uint8Array, index: number, host: number): boolean {
  return u32(table, index * 8) === (0x80000000 | Math.floor(host / 0x100000000)) >>> 0 && u32(table, index * 8 + 4) === host % 0x100000000;
}

/** Standard entry `index` becomes ZERO with no host cluster (zero-plain), as one byte. */
export function setZeroPlainEntry(table: Uint8Array, index: number): void {
  table.fill(0, index * 8, index * 8 + 7);
  table[index * 8 + 7] = Number(L2_ZERO);
}

/** Set or clear COPIED on entry `index`, keeping the rest of it. */
export function setL2Copied(table: Uint8Array, index: number, entryBytes: number, copied: boolean): void {
  const b = index * entryBytes;
  table[b] = copied ? table[b]! | 0x80 : table[b]! & 0x7f;
}

/** Every byte of entry `index` is zero (an unallocated cluster, no flags, no bitmap). */
export function l2EntryEmpty(table: Uint8Array, index: number, entryBytes: number): boolean {
  const b = index * entryBytes;
  for (let i = b; i < b + entryBytes; i++) if (table[i] !== 0) return false;
  return true;
}

/** The descriptor's COPIED flag. */
export function l2EntryCopied(d: ClusterDescriptor): boolean {
  return (d.hi & COPIED_BIT_HI) !== 0;
}

/** The descriptor's extended bitmap as one word (zero bits high, allocated bits low). */
export function l2EntryBitmap(d: ClusterDescriptor): bigint {
  return (BigInt(d.zeroBitmap >>> 0) << 32n) | BigInt(d.allocBitmap >>> 0);
}
