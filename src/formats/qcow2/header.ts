/**
 * The QCOW2 header (cluster 0): the fixed fields, the header extensions and the backing file name.
 *
 * Stable API (the qcow2 writer imports it):
 *   - `Qcow2Header`: a plain data type. Feature bit fields are bigint (any of 64 bits may be set);
 *     every offset/size is a number checked to be exact.
 *   - `decodeHeader(bytes)`: `bytes` is the start of the file, at least the first cluster or up to
 *     EOF, whichever is shorter (read `HEADER_PROBE_BYTES` first to learn the cluster size with
 *     `peekClusterBits`, then read the cluster). Structural problems throw QcowError QCOW_CORRUPT /
 *     QCOW_BAD_MAGIC / QCOW_UNSUPPORTED naming the field. Feature-bit policy (unknown incompatible
 *     bits, corrupt bit) is NOT checked here: see features.ts.
 *   - `decodeHeaderPrefix(bytes, areaLength)`: the same from the area's first bytes only, or
 *     undefined when the header reaches past them (read-header.ts reads one page first).
 *   - `encodeHeader(header, clusterSize)`: the bytes to write at file offset 0: fixed fields,
 *     extensions (in QEMU's order: backing format, FDE, data file, feature names, bitmaps, then the
 *     unknown ones verbatim), the end marker, then the backing file name. `backingFileOffset` and
 *     `backingFileSize` are recomputed from `backingFile`. Throws if it does not fit in one cluster.
 *   - `QEMU_FEATURE_NAMES`: the feature-name table qemu 7.2 writes into v3 images.
 *
 * Layout: v2 has 72 bytes of fixed fields, v3 `header_length` bytes (>= 104, a multiple of 8; qemu
 * writes 112: the compression type byte at 104, then padding). Extensions start at
 * header_length (72 for v2) and are `u32 type, u32 length, data, padding to 8`.
 */
import { u32, u64, u64big, u64Size, setU32, setU64, utf8, encodeUtf8, alignUp } from '../../core/bytes.js';
import { QcowError, corrupt, unsupported } from '../../core/errors.js';

export const QCOW2_MAGIC = 0x514649fb;
/** Enough bytes to read every fixed field of any version (v3 with the compression byte). */
export const HEADER_PROBE_BYTES = 112;
export const V2_HEADER_LENGTH = 72;
/** Where v3's feature fields sit in the header (each a big-endian u64). */
export const INCOMPATIBLE_FEATURES_OFFSET = 72;
export const AUTOCLEAR_FEATURES_OFFSET = 88;
export const V3_MIN_HEADER_LENGTH = 104;
/** What qemu 7.2 writes into new v3 images. */
export const V3_HEADER_LENGTH = 112;
/** qemu refuses longer backing file names. */
export const MAX_BACKING_NAME = 1023;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_FDE = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

export type FeatureKind = 'incompatible' | 'compatible' | 'autoclear';
export const FEATURE_KIND_CODES: Record<FeatureKind, number> = { incompatible: 0, compatible: 1, autoclear: 2 };

export interface FeatureName {
  kind: FeatureKind;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface FdeExtension {
  /** Where the LUKS header area starts in the image file (cluster aligned). */
  offset: number;
  length: number;
}

export interface UnknownExtension {
  type: number;
  data: Uint8Array;
}

export interface Qcow2Header {
  version: 2 | 3;
  /** Written as found; recomputed by encodeHeader. 0 without a backing file. */
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual size in bytes. */
  size: number;
  /** 0 none, 1 legacy AES, 2 LUKS. */
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  /** refcount_bits = 1 << refcountOrder. Always 4 in v2. */
  refcountOrder: number;
  /** 72 for v2. */
  headerLength: number;
  /** COMPRESSION_ZLIB or COMPRESSION_ZSTD. */
  compressionType: number;
  backingFile?: string;
  backingFormat?: string;
  /** Empty when the image has no table (v2 images from qemu). */
  featureNames: FeatureName[];
  dataFile?: string;
  fde?: FdeExtension;
  bitmaps?: BitmapsExtension;
  /** Extensions we do not interpret, kept for re-encoding, in file order. */
  unknownExtensions: UnknownExtension[];
}

/** The cluster_bits field, from the first HEADER_PROBE_BYTES (or fewer) bytes; checks magic and version. */
export function peekClusterBits(head: Uint8Array): number {
  if (head.length < V2_HEADER_LENGTH || u32(head, 0) !== QCOW2_MAGIC) throw new QcowError('QCOW_BAD_MAGIC', 'not a qcow2 image (bad magic)');
  checkVersion(u32(head, 4));
  return checkClusterBits(u32(head, 20));
}

function checkVersion(version: number): asserts version is 2 | 3 {
  if (version !== 2 && version !== 3) throw unsupported(`Unsupported qcow2 version ${version}`);
}

function checkClusterBits(bits: number): number {
  if (bits < 9 || bits > 21) throw corrupt(`qcow2 header: cluster_bits ${bits}: cluster size must be a power of two between 512 and 2048k`);
  return bits;
}

export function decodeHeader(bytes: Uint8Array): Qcow2Header {
  // Everything the header describes must lie in cluster 0; a short file simply ends earlier.
  return decodeHeaderArea(bytes, Math.min(bytes.length, 2 ** peekClusterBits(bytes)))!;
}

/**
 * `decodeHeader` from the first bytes of the header area only: `bytes` is its start and
 * `areaLength` its whole length (the first cluster; read-header.ts reads zeros past EOF). The same
 * header, or the same error, as decodeHeader of the whole area; undefined when the header's fields,
 * extensions or backing file name reach past `bytes` (read the whole area then). Most headers fit
 * in a few hundred bytes, and reading the whole cluster cost a page fault per 4 KiB of it (512 for
 * 2 MiB clusters) at every open.
 */
export function decodeHeaderPrefix(bytes: Uint8Array, areaLength: number): Qcow2Header | undefined {
  return decodeHeaderArea(bytes.subarray(0, Math.min(bytes.length, areaLength)), areaLength);
}

/** The decode of both: `buf` is the area's first `buf.length` (<= areaLength) bytes. */
function decodeHeaderArea(buf: Uint8Array, areaLength: number): Qcow2Header | undefined {
  if (buf.length < Math.min(areaLength, V3_HEADER_LENGTH)) return undefined;
  const clusterBits = peekClusterBits(buf);
  const version = u32(buf, 4) as 2 | 3;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(buf, 8, 'backing_file_offset'),
    backingFileSize: u32(buf, 16),
    clusterBits,
    size: u64Size(buf, 24),
    cryptMethod: u32(buf, 32),
    l1Size: u32(buf, 36),
    l1TableOffset: u64(buf, 40, 'l1_table_offset'),
    refcountTableOffset: u64(buf, 48, 'refcount_table_offset'),
    refcountTableClusters: u32(buf, 56),
    nbSnapshots: u32(buf, 60),
    snapshotsOffset: u64(buf, 64, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: COMPRESSION_ZLIB,
    featureNames: [],
    unknownExtensions: [],
  };
  if (version === 3) {
    if (buf.length < V3_MIN_HEADER_LENGTH) throw corrupt('qcow2 header too short');
    h.incompatibleFeatures = u64big(buf, INCOMPATIBLE_FEATURES_OFFSET);
    h.compatibleFeatures = u64big(buf, 80);
    h.autoclearFeatures = u64big(buf, AUTOCLEAR_FEATURES_OFFSET);
    h.refcountOrder = u32(buf, 96);
    h.headerLength = u32(buf, 100);
    if (h.headerLength < V3_MIN_HEADER_LENGTH) throw corrupt(`qcow2 header too short (header_length ${h.headerLength})`);
    // Past the first cluster is the graver fault, and QEMU reports it first.
    if (h.headerLength > areaLength) throw corrupt(`qcow2 header: header_length ${h.headerLength} is larger than the first cluster or the file`);
    if (h.headerLength % 8 !== 0) throw corrupt(`qcow2 header: header_length ${h.headerLength} is not a multiple of 8`);
    if (h.headerLength > buf.length) return undefined;
    if (h.headerLength > V3_MIN_HEADER_LENGTH) h.compressionType = buf[104]!;
  }
  // Checked before the header's other fields, as QEMU does: it also bounds the extensions' area.
  if (h.backingFileOffset > areaLength) throw corrupt(`qcow2 header: backing_file_offset 0x${h.backingFileOffset.toString(16)} lies past the first cluster`);
  if (h.refcountOrder > 6) throw corrupt(`qcow2 header: refcount_order ${h.refcountOrder}: refcount width must be a power of two and may not exceed 64 bits`);
  if (h.compressionType !== COMPRESSION_ZLIB && h.compressionType !== COMPRESSION_ZSTD) {
    throw unsupported(`qcow2 header: unknown compression type ${h.compressionType}`);
  }
  const ctypeBit = (h.incompatibleFeatures >> 3n) & 1n;
  if ((h.compressionType !== COMPRESSION_ZLIB) !== (ctypeBit === 1n)) {
    throw corrupt('qcow2 header: compression type and the compression-type incompatible feature bit disagree');
  }
  if (!decodeExtensions(buf, areaLength, h)) return undefined;
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME) throw corrupt(`qcow2 header: backing file name is too long (${h.backingFileSize} bytes)`);
    if (h.backingFileOffset + h.backingFileSize > areaLength) throw corrupt('qcow2 header: backing file name lies outside the first cluster');
    if (h.backingFileOffset + h.backingFileSize > buf.length) return undefined;
    h.backingFile = utf8(buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
  }
  return h;
}

/** Decode the extensions into `h`; false when they reach past `buf` (see decodeHeaderArea). */
function decodeExtensions(buf: Uint8Array, areaLength: number, h: Qcow2Header): boolean {
  // The backing file name, when present, follows the extensions; they must stop before it.
  const end = h.backingFileOffset !== 0 && h.backingFileOffset < areaLength ? h.backingFileOffset : areaLength;
  let off = h.headerLength;
  while (off < end) {
    // As qemu's qcow2_read_extensions: an extension's own 8 bytes must fit before the end too.
    if (off + 8 > end) throw corrupt(`qcow2 header extension at 0x${off.toString(16)} runs past the header area`);
    if (off + 8 > buf.length) return false;
    const type = u32(buf, off);
    const len = u32(buf, off + 4);
    if (type === EXT_END) return true;
    const data = off + 8 + len;
    if (data > end) throw corrupt(`qcow2 header extension 0x${type.toString(16)} at 0x${off.toString(16)}: length ${len} runs past the header area`);
    if (data > buf.length) return false;
    const body = buf.subarray(off + 8, data);
    decodeExtension(type, body, h);
    off = alignUp(data, 8);
  }
  // qemu accepts a list that simply reaches the end of the area without a terminator.
  return true;
}

function decodeExtension(type: number, body: Uint8Array, h: Qcow2Header): void {
  const need = (n: number, what: string) => {
    if (body.length < n) throw corrupt(`qcow2 header extension '${what}' is too short (${body.length} bytes)`);
  };
  switch (type) {
    case EXT_BACKING_FORMAT:
      h.backingFormat = utf8(body);
      break;
    case EXT_FEATURE_NAMES:
      // 48-byte entries, read as QEMU reads them: a short last entry is padded with zeros, and
      // the first entry with an empty name ends the table.
      for (let i = 0; i < body.length; i += 48) {
        const entry = new Uint8Array(48);
        entry.set(body.subarray(i, i + 48));
        const raw = entry.subarray(2);
        const nul = raw.indexOf(0);
        if (nul === 0) break;
        const kind = (['incompatible', 'compatible', 'autoclear'] as const)[entry[0]!];
        if (!kind) continue; // an unknown kind cannot name any bit we check
        h.featureNames.push({ kind, bit: entry[1]!, name: utf8(nul < 0 ? raw : raw.subarray(0, nul)) });
      }
      break;
    case EXT_DATA_FILE:
      h.dataFile = utf8(body);
      break;
    case EXT_FDE:
      need(16, 'full disk encryption header pointer');
      h.fde = { offset: u64(body, 0, 'FDE header offset'), length: u64(body, 8, 'FDE header length') };
      break;
    case EXT_BITMAPS:
      need(24, 'bitmaps');
      h.bitmaps = { nbBitmaps: u32(body, 0), directorySize: u64(body, 8, 'bitmap directory size'), directoryOffset: u64(body, 16, 'bitmap directory offset') };
      break;
    default:
      h.unknownExtensions.push({ type, data: body.slice() });
  }
}

/** The feature-name table qemu 7.2 puts into v3 images (see qemuFeatureNames for which). */
export const QEMU_FEATURE_NAMES: readonly FeatureName[] = [
  { kind: 'incompatible', bit: 0, name: 'dirty bit' },
  { kind: 'incompatible', bit: 1, name: 'corrupt bit' },
  { kind: 'incompatible', bit: 2, name: 'external data file' },
  { kind: 'incompatible', bit: 3, name: 'compression type' },
  { kind: 'incompatible', bit: 4, name: 'extended L2 entries' },
  { kind: 'compatible', bit: 0, name: 'lazy refcounts' },
  { kind: 'autoclear', bit: 0, name: 'bitmaps' },
  { kind: 'autoclear', bit: 1, name: 'raw external data' },
];

/**
 * The feature-name table qemu 7.2 writes with a header of `version` and `clusterBits`: none for
 * v2, nor with clusters of 4 KiB or less (where the table would crowd the first cluster); checked
 * against qemu-img create and qemu-img amend -o compat=1.1 at 512 B, 4 KiB and 8 KiB.
 */
export function qemuFeatureNames(version: number, clusterBits: number): FeatureName[] {
  return version === 3 && clusterBits > 12 ? [...QEMU_FEATURE_NAMES] : [];
}

export function encodeHeader(h: Qcow2Header, clusterSize: number): Uint8Array {
  const headerLength = h.version === 2 ? V2_HEADER_LENGTH : h.headerLength;
  if (h.version === 3 && (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0)) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `qcow2 header: invalid header_length ${headerLength}`);
  }
  const exts: { type: number; data: Uint8Array }[] = [];
  if (h.backingFormat !== undefined) exts.push({ type: EXT_BACKING_FORMAT, data: encodeUtf8(h.backingFormat) });
  if (h.fde) {
    const d = new Uint8Array(16);
    setU64(d, 0, h.fde.offset);
    setU64(d, 8, h.fde.length);
    exts.push({ type: EXT_FDE, data: d });
  }
  if (h.dataFile !== undefined) exts.push({ type: EXT_DATA_FILE, data: encodeUtf8(h.dataFile) });
  if (h.featureNames.length) {
    const d = new Uint8Array(48 * h.featureNames.length);
    h.featureNames.forEach((f, i) => {
      d[i * 48] = FEATURE_KIND_CODES[f.kind];
      d[i * 48 + 1] = f.bit;
      d.set(encodeUtf8(f.name).subarray(0, 46), i * 48 + 2);
    });
    exts.push({ type: EXT_FEATURE_NAMES, data: d });
  }
  if (h.bitmaps) {
    const d = new Uint8Array(24);
    setU32(d, 0, h.bitmaps.nbBitmaps);
    setU64(d, 8, h.bitmaps.directorySize);
    setU64(d, 16, h.bitmaps.directoryOffset);
    exts.push({ type: EXT_BITMAPS, data: d });
  }
  exts.push(...h.unknownExtensions);

  const backingName = h.backingFile !== undefined ? encodeUtf8(h.backingFile) : undefined;
  if (backingName && backingName.length > MAX_BACKING_NAME) throw new QcowError('QCOW_INVALID_ARGUMENT', 'backing file name is too long (max 1023 bytes)');
  let extBytes = 8; // the end marker
  for (const e of exts) extBytes += 8 + alignUp(e.data.length, 8);
  const backingOffset = headerLength + extBytes;
  const total = backingOffset + (backingName?.length ?? 0);
  if (total > clusterSize) throw new QcowError('QCOW_INVALID_ARGUMENT', `qcow2 header, extensions and backing name (${total} bytes) do not fit in one cluster`);

  const out = new Uint8Array(total);
  setU32(out, 0, QCOW2_MAGIC);
  setU32(out, 4, h.version);
  setU64(out, 8, backingName ? backingOffset : 0);
  setU32(out, 16, backingName?.length ?? 0);
  setU32(out, 20, h.clusterBits);
  setU64(out, 24, h.size);
  setU32(out, 32, h.cryptMethod);
  setU32(out, 36, h.l1Size);
  setU64(out, 40, h.l1TableOffset);
  setU64(out, 48, h.refcountTableOffset);
  setU32(out, 56, h.refcountTableClusters);
  setU32(out, 60, h.nbSnapshots);
  setU64(out, 64, h.snapshotsOffset);
  if (h.version === 3) {
    setU64(out, INCOMPATIBLE_FEATURES_OFFSET, h.incompatibleFeatures);
    setU64(out, 80, h.compatibleFeatures);
    setU64(out, AUTOCLEAR_FEATURES_OFFSET, h.autoclearFeatures);
    setU32(out, 96, h.refcountOrder);
    setU32(out, 100, headerLength);
    if (headerLength > V3_MIN_HEADER_LENGTH) out[104] = h.compressionType;
  }
  let off = headerLength;
  for (const e of exts) {
    setU32(out, off, e.type);
    setU32(out, off + 4, e.data.length);
    out.set(e.data, off + 8);
    off += 8 + alignUp(e.data.length, 8);
  }
  // End marker: 8 zero bytes, already zero.
  if (backingName) out.set(backingName, backingOffset);
  return out;
}
