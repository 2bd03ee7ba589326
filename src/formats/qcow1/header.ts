/**
 * The 48-byte qcow (version 1) header: its codec and every check QEMU's `qcow` driver makes when
 * it opens an image. All fields are big-endian. The header is written once, at create, and never
 * changes afterwards (qcow v1 has no dirty flag, refcounts or feature bits).
 */
import { QcowError, corrupt, unsupported } from '../../core/errors.js';
import { setU32, setU64, u32, u64big, u8 } from '../../core/bytes.js';

export const QCOW_MAGIC = 0x514649fb; // "QFI\xfb", shared with qcow2
export const QCOW_VERSION = 1;
export const HEADER_SIZE = 48;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 16;
export const MIN_L2_BITS = 6;
export const MAX_L2_BITS = 13;
/** Longest backing file name QEMU reads (1023 bytes; it keeps a 1024-byte C string). */
export const MAX_BACKING_NAME = 1023;
/**
 * Most L1 entries QEMU can load: it reads the table in one request, and its largest request is
 * 0x7FFFFE00 bytes (the INT_MAX/8 limit it checks explicitly is higher, so this is the real one).
 */
export const MAX_L1_SIZE = Math.floor(0x7ffffe00 / 8);

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;

export interface QcowHeader {
  /** 0 when there is no backing file. */
  backingFileOffset: number;
  /** Length in bytes of the backing file name (no NUL terminator). */
  backingFileSize: number;
  /** QEMU writes 0 and never reads it; kept as found. */
  mtime: number;
  /** The header's size field in bytes (the guest sees it rounded down to 512). */
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
}

/** Entries in the L1 table, derived from the header (qcow v1 does not store it). */
export function l1SizeOf(h: Pick<QcowHeader, 'size' | 'clusterBits' | 'l2Bits'>): number {
  return Math.ceil(h.size / 2 ** (h.clusterBits + h.l2Bits));
}

/** The guest-visible size: QEMU counts whole 512-byte sectors, so a ragged tail is dropped. */
export function virtualSizeOf(h: Pick<QcowHeader, 'size'>): number {
  return Math.floor(h.size / 512) * 512;
}

/** How surely `head` is a qcow v1 image: QEMU's qcow driver claims the magic with version 1 only. */
export function probeQcow1(head: Uint8Array): number {
  if (head.length < 8) return 0;
  return u32(head, 0) === QCOW_MAGIC && u32(head, 4) === QCOW_VERSION ? 100 : 0;
}

/**
 * Decode and validate a header. `fileSize` is the length of the image file: the L1 table and
 * the backing file name must lie inside it. Every failure names the field and what is wrong.
 */
export function decodeHeader(buf: Uint8Array, fileSize: number): QcowHeader {
  if (buf.length < HEADER_SIZE || fileSize < HEADER_SIZE) throw new QcowError('QCOW_BAD_MAGIC', `Image not in qcow format (file is shorter than the ${HEADER_SIZE}-byte header)`);
  if (u32(buf, 0) !== QCOW_MAGIC) throw new QcowError('QCOW_BAD_MAGIC', 'Image not in qcow format (bad magic)');
  const version = u32(buf, 4);
  if (version !== QCOW_VERSION) {
    throw unsupported(`qcow (v1) does not support qcow version ${version}${version === 2 || version === 3 ? " (try the 'qcow2' format)" : ''}`);
  }
  const backingFileOffset = u64big(buf, 8);
  const backingFileSize = u32(buf, 16);
  const mtime = u32(buf, 20);
  const size = u64big(buf, 24);
  const clusterBits = u8(buf, 32);
  const l2Bits = u8(buf, 33);
  const cryptMethod = u32(buf, 36);
  const l1TableOffset = u64big(buf, 40);

  if (size <= 1n) throw corrupt(`header size ${size} is too small (must be at least 2 bytes)`);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(`header cluster_bits ${clusterBits} is out of range: the cluster size must be between 512 and 64k`);
  }
  if (l2Bits < MIN_L2_BITS || l2Bits > MAX_L2_BITS) {
    throw corrupt(`header l2_bits ${l2Bits} is out of range: the L2 table size must be between 512 and 64k`);
  }
  if (cryptMethod > CRYPT_AES) throw corrupt(`header crypt_method ${cryptMethod} is not a valid encryption method (0 none, 1 AES)`);

  const shift = BigInt(clusterBits + l2Bits);
  if (size > 2n ** 64n - (1n << shift)) throw unsupported(`header size ${size}: image too large`);
  const l1Size = (size + (1n << shift) - 1n) >> shift;
  if (l1Size > BigInt(MAX_L1_SIZE)) throw unsupported(`header size ${size}: image too large (L1 table of ${l1Size} entries; at most ${MAX_L1_SIZE})`);
  // With l1Size bounded, size < 2^29 * 2^28 < 2^53, so it is exact as a number from here on.

  const l1Bytes = Number(l1Size) * 8;
  if (l1TableOffset > BigInt(fileSize) || Number(l1TableOffset) + l1Bytes > fileSize) {
    throw corrupt(`header l1_table_offset 0x${l1TableOffset.toString(16)}: the L1 table (${l1Bytes} bytes) runs past the end of the file (${fileSize} bytes)`);
  }

  if (backingFileOffset !== 0n) {
    if (backingFileSize > MAX_BACKING_NAME) throw corrupt(`header backing_file_size ${backingFileSize}: backing file name too long (at most ${MAX_BACKING_NAME} bytes)`);
    if (backingFileOffset > BigInt(fileSize) || Number(backingFileOffset) + backingFileSize > fileSize) {
      throw corrupt(`header backing_file_offset 0x${backingFileOffset.toString(16)}: the backing file name (${backingFileSize} bytes) runs past the end of the file`);
    }
  }

  return {
    backingFileOffset: Number(backingFileOffset),
    backingFileSize: backingFileOffset === 0n ? 0 : backingFileSize,
    mtime,
    size: Number(size),
    clusterBits,
    l2Bits,
    cryptMethod,
    l1TableOffset: Number(l1TableOffset),
  };
}

export function encodeHeader(h: QcowHeader): Uint8Array {
  const b = new Uint8Array(HEADER_SIZE);
  setU32(b, 0, QCOW_MAGIC);
  setU32(b, 4, QCOW_VERSION);
  setU64(b, 8, h.backingFileOffset);
  setU32(b, 16, h.backingFileSize);
  setU32(b, 20, h.mtime);
  setU64(b, 24, h.size);
  b[32] = h.clusterBits;
  b[33] = h.l2Bits;
  // bytes 34..35: padding, written as zero as QEMU does
  setU32(b, 36, h.cryptMethod);
  setU64(b, 40, h.l1TableOffset);
  return b;
}
