/**
 * The persistent dirty bitmap directory (header extension 0x23852875), decoded far enough for
 * `info` (each bitmap's name, granularity and flags) and for setting the `in_use` flag of enabled
 * bitmaps before qcow writes (see markEnabledBitmapsInUse). Bitmap tables are not read.
 * Entry: u64 table offset, u32 table size, u32 flags, u8 type, u8 granularity_bits,
 * u16 name_size, u32 extra_data_size, extra data, name, padding to 8.
 */
import { setU32, u16, u32, u8, utf8, alignUp } from '../../core/bytes.js';
import { corrupt } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import type { BitmapsExtension } from './header.js';

export interface BitmapInfo {
  name: string;
  granularity: number;
  inUse: boolean;
  auto: boolean;
}

/** qemu's limits: 65535 bitmaps, a 64 MiB directory. */
const MAX_BITMAPS = 65535;
const MAX_DIRECTORY = 64 * 1024 * 1024;

/** Bitmap directory entry flags. */
const FLAG_IN_USE = 1;
const FLAG_AUTO = 2;

/** One directory entry: what `info` shows, and where its flags field sits in the directory. */
interface DirectoryEntry extends BitmapInfo {
  flagsAt: number;
  flags: number;
}

async function readDirectory(store: ByteStore, ext: BitmapsExtension, fileSize: number): Promise<{ dir: Uint8Array; entries: DirectoryEntry[] }> {
  const { nbBitmaps, directorySize, directoryOffset } = ext;
  if (nbBitmaps === 0) return { dir: new Uint8Array(0), entries: [] };
  if (nbBitmaps > MAX_BITMAPS || directorySize > MAX_DIRECTORY || directoryOffset + directorySize > fileSize) {
    throw corrupt(`bitmap directory (${nbBitmaps} bitmaps, ${directorySize} bytes at 0x${directoryOffset.toString(16)}) is invalid`);
  }
  const dir = new Uint8Array(directorySize);
  await store.read(directoryOffset, dir);
  const entries: DirectoryEntry[] = [];
  let pos = 0;
  for (let i = 0; i < nbBitmaps; i++) {
    if (pos + 24 > dir.length) throw corrupt(`bitmap directory: entry ${i} runs past the directory`);
    const flags = u32(dir, pos + 12);
    const granularityBits = u8(dir, pos + 17);
    const nameSize = u16(dir, pos + 18);
    const extra = u32(dir, pos + 20);
    const end = pos + 24 + extra + nameSize;
    if (end > dir.length || granularityBits > 63) throw corrupt(`bitmap directory: entry ${i} is invalid`);
    entries.push({
      name: utf8(dir.subarray(pos + 24 + extra, end)),
      granularity: 2 ** granularityBits,
      inUse: (flags & FLAG_IN_USE) !== 0,
      auto: (flags & FLAG_AUTO) !== 0,
      flagsAt: pos + 12,
      flags,
    });
    pos = alignUp(end, 8);
  }
  return { dir, entries };
}

export async function readBitmapDirectory(store: ByteStore, ext: BitmapsExtension, fileSize: number): Promise<BitmapInfo[]> {
  return (await readDirectory(store, ext, fileSize)).entries.map(({ name, granularity, inUse, auto }) => ({ name, granularity, inUse, auto }));
}

/**
 * Before qcow changes an image's guest content, every enabled (`auto`) bitmap is set `in_use`
 * on disk, durably, exactly as a QEMU that crashed while writing would leave it: QEMU then
 * reports the bitmap as inconsistent and refuses to export or use it, and `qemu-img bitmap
 * --remove` still removes it. qcow does not yet record its writes in bitmaps, so without this a
 * bitmap would keep calling the clusters qcow wrote clean, and the next incremental backup that
 * trusts it would silently miss them. Disabled bitmaps do not track writes and stay valid.
 * Returns how many bitmaps it marked.
 */
export async function markEnabledBitmapsInUse(store: ByteStore, ext: BitmapsExtension, fileSize: number): Promise<number> {
  const { entries } = await readDirectory(store, ext, fileSize);
  const field = new Uint8Array(4);
  let marked = 0;
  for (const e of entries) {
    if (!e.auto || e.inUse) continue;
    setU32(field, 0, e.flags | FLAG_IN_USE);
    await store.write(ext.directoryOffset + e.flagsAt, field);
    marked++;
  }
  if (marked > 0) await store.flush();
  return marked;
}
