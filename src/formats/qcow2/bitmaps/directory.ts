/**
 * The bitmap directory: the list of persistent dirty bitmaps that the bitmaps header extension
 * (0x23852875) points at. Pure codec, no I/O.
 *
 * Entry layout (big endian): u64 bitmap_table_offset, u32 bitmap_table_size (entries), u32 flags,
 * u8 type (1 = dirty tracking), u8 granularity_bits, u16 name_size, u32 extra_data_size, then the
 * extra data, the name (UTF-8, no NUL) and zero padding to a multiple of 8.
 *
 * Every length read from the image is checked against the buffer and against QEMU's limits
 * before it is used, so a hostile directory gives one QCOW_CORRUPT error and never a large
 * allocation: the only buffer sized by the image is the directory itself, capped at
 * MAX_DIRECTORY_SIZE by the caller.
 */
import { alignUp, encodeUtf8, setU16, setU32, setU64, u16, u32, u64, u8, utf8 } from '../../../core/bytes.js';
import { corrupt } from '../../../core/errors.js';

export const FLAG_IN_USE = 1 << 0;
export const FLAG_AUTO = 1 << 1;
export const FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2;
/** The flags the spec defines; any other bit makes the bitmap unusable. */
const KNOWN_FLAGS = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;

export const TYPE_DIRTY_TRACKING = 1;
/** QEMU's limits, which we share so images stay portable both ways. */
export const MAX_BITMAPS = 65535;
export const MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
export const MAX_NAME_SIZE = 1023;
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
export const MAX_TABLE_SIZE = 0x8000000;
/** Bytes of bitmap data (table entries times cluster size) QEMU accepts for one bitmap. */
export const MAX_PHYS_SIZE = 0x20000000;

const ENTRY_HEADER = 24;

export interface BitmapEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  /** Kept verbatim so rewriting the directory does not lose what another program stored. */
  extraData: Uint8Array;
}

export const entrySize = (e: BitmapEntry): number => alignUp(ENTRY_HEADER + e.extraData.length + encodeUtf8(e.name).length, 8);

/** Decode `count` entries from `dir` (the whole directory). Throws QCOW_CORRUPT on any overrun. */
export function decodeDirectory(dir: Uint8Array, count: number): BitmapEntry[] {
  if (count > MAX_BITMAPS) throw corrupt(`bitmap directory: ${count} bitmaps exceed the maximum of ${MAX_BITMAPS}`);
  const out: BitmapEntry[] = [];
  const names = new Set<string>();
  let pos = 0;
  for (let i = 0; i < count; i++) {
    if (pos + ENTRY_HEADER > dir.length) throw corrupt(`bitmap directory: entry ${i} runs past the directory`);
    const nameSize = u16(dir, pos + 18);
    const extra = u32(dir, pos + 20);
    if (nameSize === 0 || nameSize > MAX_NAME_SIZE) throw corrupt(`bitmap directory: entry ${i} has an invalid name length ${nameSize}`);
    const end = pos + ENTRY_HEADER + extra + nameSize;
    if (end > dir.length) throw corrupt(`bitmap directory: entry ${i} runs past the directory`);
    const e: BitmapEntry = {
      tableOffset: u64(dir, pos, 'bitmap table offset'),
      tableSize: u32(dir, pos + 8),
      flags: u32(dir, pos + 12),
      type: u8(dir, pos + 16),
      granularityBits: u8(dir, pos + 17),
      extraData: dir.slice(pos + ENTRY_HEADER, pos + ENTRY_HEADER + extra),
      name: utf8(dir.subarray(pos + ENTRY_HEADER + extra, end)),
    };
    if (names.has(e.name)) throw corrupt(`bitmap directory: duplicate bitmap name '${e.name}'`);
    names.add(e.name);
    out.push(e);
    pos = alignUp(end, 8);
  }
  if (pos !== dir.length) throw corrupt(`bitmap directory: ${dir.length} bytes, but its ${count} entries take ${pos}`);
  return out;
}

export function encodeDirectory(entries: readonly BitmapEntry[]): Uint8Array {
  const out = new Uint8Array(entries.reduce((n, e) => n + entrySize(e), 0));
  let pos = 0;
  for (const e of entries) {
    const name = encodeUtf8(e.name);
    setU64(out, pos, e.tableOffset);
    setU32(out, pos + 8, e.tableSize);
    setU32(out, pos + 12, e.flags);
    out[pos + 16] = e.type;
    out[pos + 17] = e.granularityBits;
    setU16(out, pos + 18, name.length);
    setU32(out, pos + 20, e.extraData.length);
    out.set(e.extraData, pos + ENTRY_HEADER);
    out.set(name, pos + ENTRY_HEADER + e.extraData.length);
    pos += entrySize(e);
  }
  return out;
}

/** Table entries a bitmap of `granularityBits` over `size` guest bytes needs. */
export function tableSizeFor(size: number, granularityBits: number, clusterSize: number): number {
  const bits = Math.ceil(size / 2 ** granularityBits);
  return Math.ceil(Math.ceil(bits / 8) / clusterSize);
}

export interface ImageGeometry {
  clusterSize: number;
  /** Virtual size. */
  size: number;
  fileSize: number;
}

/**
 * Why this bitmap cannot be read or written (QEMU's rules, plus bounds against the file), or
 * undefined when it can. An unusable bitmap is still listed and can still be removed.
 */
export function unusableReason(e: BitmapEntry, g: ImageGeometry): string | undefined {
  if (e.type !== TYPE_DIRTY_TRACKING) return `unknown bitmap type ${e.type}`;
  // >>> 0: JavaScript's bit operators give a signed word, and bit 31 must print as 0x80000000.
  const unknown = (e.flags & ~KNOWN_FLAGS) >>> 0;
  if (unknown) return `unknown flags 0x${unknown.toString(16)}`;
  if (e.granularityBits < MIN_GRANULARITY_BITS || e.granularityBits > MAX_GRANULARITY_BITS) return `granularity bits ${e.granularityBits} out of range`;
  if (e.extraData.length > 0 && !(e.flags & FLAG_EXTRA_DATA_COMPATIBLE)) return 'it has extra data this program does not understand';
  if (e.tableSize === 0 || e.tableSize > MAX_TABLE_SIZE || e.tableSize * g.clusterSize > MAX_PHYS_SIZE) return `invalid table size ${e.tableSize}`;
  if (e.tableOffset === 0 || e.tableOffset % g.clusterSize !== 0 || e.tableOffset + e.tableSize * 8 > g.fileSize) return `invalid table offset 0x${e.tableOffset.toString(16)}`;
  if (e.flags & FLAG_IN_USE) return 'it is inconsistent (in use: the program that had it open did not store it)';
  if (e.tableSize < tableSizeFor(g.size, e.granularityBits, g.clusterSize)) return `its table (${e.tableSize} entries) is too small for the disk`;
  return undefined;
}

/**
 * Why this entry is malformed, which QEMU refuses at open and `check -r all` removes: the rules of
 * unusableReason except the two a healthy image can break for a while (left in use by a crash,
 * a table sized for the disk before a resize), or undefined.
 */
export function malformedReason(e: BitmapEntry, clusterSize: number, fileSize: number): string | undefined {
  return unusableReason({ ...e, flags: e.flags & ~FLAG_IN_USE }, { clusterSize, size: 0, fileSize });
}
