/**
 * The persistent dirty bitmap directory (header extension 0x23852875), decoded far enough for
 * `info`: each bitmap's name, granularity and flags. Bitmap tables themselves are not read.
 * Entry: u64 table offset, u32 table size, u32 flags, u8 type, u8 granularity_bits,
 * u16 name_size, u32 extra_data_size, extra data, name, padding to 8.
 */
import { u16, u32, u8, utf8, alignUp } from '../../core/bytes.js';
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

export async function readBitmapDirectory(store: ByteStore, ext: BitmapsExtension, fileSize: number): Promise<BitmapInfo[]> {
  const { nbBitmaps, directorySize, directoryOffset } = ext;
  if (nbBitmaps === 0) return [];
  if (nbBitmaps > MAX_BITMAPS || directorySize > MAX_DIRECTORY || directoryOffset + directorySize > fileSize) {
    throw corrupt(`bitmap directory (${nbBitmaps} bitmaps, ${directorySize} bytes at 0x${directoryOffset.toString(16)}) is invalid`);
  }
  const dir = new Uint8Array(directorySize);
  await store.read(directoryOffset, dir);
  const out: BitmapInfo[] = [];
  let pos = 0;
  for (let i = 0; i < nbBitmaps; i++) {
    if (pos + 24 > dir.length) throw corrupt(`bitmap directory: entry ${i} runs past the directory`);
    const flags = u32(dir, pos + 12);
    const granularityBits = u8(dir, pos + 17);
    const nameSize = u16(dir, pos + 18);
    const extra = u32(dir, pos + 20);
    const end = pos + 24 + extra + nameSize;
    if (end > dir.length || granularityBits > 63) throw corrupt(`bitmap directory: entry ${i} is invalid`);
    out.push({ name: utf8(dir.subarray(pos + 24 + extra, end)), granularity: 2 ** granularityBits, inUse: (flags & 1) !== 0, auto: (flags & 2) !== 0 });
    pos = alignUp(end, 8);
  }
  return out;
}
