/**
 * `check -r all` on bitmaps: drop the bitmaps nothing can read (a directory entry or table that
 * is malformed), which QEMU can neither repair nor remove (qemu issue 2909). Bitmaps merely left
 * in use by a crash are kept: they are well formed and `qcow bitmap --remove` takes them.
 *
 * Runs before the refcount check, outside any writer: the surviving entries are written as a new
 * directory at the end of the file, flushed, then the header is pointed at it (or the extension
 * removed when none survive). The new directory's cluster has no refcount yet and the dropped
 * structures keep theirs: the refcount repair that follows fixes both. A kill in between leaves
 * the old directory in place, or a leaked cluster.
 */
import { alignUp } from '../../../core/bytes.js';
import type { ByteStore } from '../../../storage/types.js';
import { encodeHeader, type Qcow2Header } from '../header.js';
import { AUTOCLEAR_BITMAPS, hasFeature } from '../features.js';
import { MAX_BITMAPS, MAX_DIRECTORY_SIZE, decodeDirectory, encodeDirectory, malformedReason, type BitmapEntry } from './directory.js';
import { decodeTable } from './table.js';

/** Why a bitmap's structures cannot be read (in use does not count), or undefined. */
async function brokenReason(store: ByteStore, e: BitmapEntry, cs: number, fileSize: number): Promise<string | undefined> {
  const why = malformedReason(e, cs, fileSize);
  if (why) return why;
  const buf = new Uint8Array(e.tableSize * 8);
  await store.read(e.tableOffset, buf);
  try {
    decodeTable(buf, cs, fileSize, e.name);
    return undefined;
  } catch (err) {
    return (err as Error).message;
  }
}

/** Drop broken bitmaps (see above); returns one message per bitmap dropped. */
export async function dropBrokenBitmaps(store: ByteStore, h: Qcow2Header, fileSize: number): Promise<string[]> {
  const ext = h.bitmaps;
  if (!ext || !hasFeature(h.autoclearFeatures, AUTOCLEAR_BITMAPS)) return [];
  const cs = 2 ** h.clusterBits;
  let entries: BitmapEntry[] | undefined;
  const sane = ext.nbBitmaps > 0 && ext.nbBitmaps <= MAX_BITMAPS && ext.directorySize <= MAX_DIRECTORY_SIZE && ext.directoryOffset % cs === 0 && ext.directoryOffset + ext.directorySize <= fileSize;
  if (sane) {
    const dir = new Uint8Array(ext.directorySize);
    await store.read(ext.directoryOffset, dir);
    try {
      entries = decodeDirectory(dir, ext.nbBitmaps);
    } catch {
      entries = undefined;
    }
  }
  const messages: string[] = [];
  const keep: BitmapEntry[] = [];
  if (!entries) messages.push('Repairing bitmap directory: unreadable, every bitmap removed');
  else {
    for (const e of entries) {
      const why = await brokenReason(store, e, cs, fileSize);
      if (why) messages.push(`Repairing bitmap '${e.name}': removed (${why})`);
      else keep.push(e);
    }
    if (messages.length === 0) return [];
  }
  const next: Qcow2Header = { ...h };
  if (keep.length > 0) {
    const dir = encodeDirectory(keep);
    const at = alignUp(fileSize, cs);
    const padded = new Uint8Array(alignUp(dir.length, cs));
    padded.set(dir);
    await store.write(at, padded);
    await store.flush();
    next.bitmaps = { nbBitmaps: keep.length, directorySize: dir.length, directoryOffset: at };
  } else {
    next.bitmaps = undefined;
    next.autoclearFeatures &= ~AUTOCLEAR_BITMAPS;
  }
  await store.write(0, encodeHeader(next, cs));
  await store.flush();
  return messages;
}
