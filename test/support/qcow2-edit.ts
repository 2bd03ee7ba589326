/**
 * For tests that break qcow2 images by hand: the header of an image open for editing, as bytes (the
 * first 64 KiB, where the header and its extensions live) and decoded.
 */
import type { FileHandle } from 'node:fs/promises';
import { decodeHeader, type Qcow2Header } from '#src/formats/qcow2/header.js';

export async function headerOf(fh: FileHandle): Promise<{ head: Uint8Array; header: Qcow2Header }> {
  const head = new Uint8Array(65536);
  await fh.read(head, 0, head.length, 0);
  return { head, header: decodeHeader(head) };
}

/** Host offset of the L2 table the first L1 entry points at (0 when it has none). */
export async function firstL2Offset(fh: FileHandle): Promise<number> {
  const { header } = await headerOf(fh);
  const l1 = new Uint8Array(8);
  await fh.read(l1, 0, 8, header.l1TableOffset);
  return Number(new DataView(l1.buffer).getBigUint64(0) & 0x00fffffffffffe00n);
}
