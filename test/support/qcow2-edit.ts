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
