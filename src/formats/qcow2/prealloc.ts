/**
 * Metadata preallocation, as `qemu-img map` sees it. An image made with preallocation=metadata
 * maps every cluster, but the data clusters are holes in the file; qemu then asks the file
 * whether each data range is a hole and reports it as `zero: true, data: true`.
 *
 * Detection is qemu's idea: the image counts as metadata-preallocated when clearly more clusters
 * have a refcount than the file really occupies (allocated blocks). With the host addon the file
 * says where its holes are (SEEK_HOLE), as for qemu; without it (Node has no SEEK_HOLE) a range
 * counts as a hole when it reads as zeros. That guess is wrong for zeros really written into the
 * file (qemu-img amend writes some), so our threshold is
 * stricter than qemu's (twice the allocated clusters, not 10/9): images with only a few holes are
 * not taken for preallocated ones. Differences from qemu remain possible in between.
 */
import { isZero } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';
import { decodeRefcountTable, entriesPerBlock, getRefcount } from './refcount.js';
import { MAX_REFCOUNT_TABLE_BYTES } from './layout.js';
import type { Qcow2Header } from './header.js';

export async function detectMetadataPreallocation(store: ByteStore, h: Qcow2Header, fileSize: number): Promise<boolean> {
  if (!store.allocatedSize) return false;
  const cs = 2 ** h.clusterBits;
  const realClusters = Math.floor((await store.allocatedSize()) / cs);
  let threshold = Math.max(realClusters * 2, realClusters + 16);
  const tableBytes = h.refcountTableClusters * cs;
  if (tableBytes > MAX_REFCOUNT_TABLE_BYTES || h.refcountTableOffset + tableBytes > fileSize) return false;
  const bits = 2 ** h.refcountOrder;
  const perBlock = entriesPerBlock(cs, bits);
  const nbClusters = Math.ceil(fileSize / cs);
  // Only the file's clusters are counted: when they are too few to reach the threshold (a file
  // with few or no holes, the common case), the answer is no without reading a refcount block.
  if (nbClusters < threshold) return false;
  // Only the entries whose blocks describe clusters of the file (qemu sizes the table for growth:
  // a 4 TiB image's table has tens of thousands of entries for a few used ones).
  const entries = Math.min(tableBytes / 8, Math.ceil(nbClusters / perBlock));
  const table = new Uint8Array(entries * 8);
  await store.read(h.refcountTableOffset, table);
  const blocks = decodeRefcountTable(table, entries, cs);
  const block = new Uint8Array(cs);
  for (let b = 0; b * perBlock < nbClusters && b < blocks.length; b++) {
    const off = blocks[b]!;
    if (off === 0 || off + cs > fileSize) continue;
    await store.read(off, block);
    const n = Math.min(perBlock, nbClusters - b * perBlock);
    if (bits === 16) {
      // The default width, looked at as byte pairs: every cluster of the file passes here.
      for (let i = 0; i < n; i++) if ((block[2 * i]! | block[2 * i + 1]!) !== 0 && --threshold === 0) return true;
      continue;
    }
    for (let i = 0; i < n; i++) {
      if (getRefcount(block, i, bits) > 0 && --threshold === 0) return true;
    }
  }
  return false;
}

/** File-system block size used to look for holes. */
export const HOLE_GRANULARITY = 4096;

/**
 * Split [hostOffset, +length) into runs that are holes (zero) or not, offsets relative to
 * hostOffset. The file's own answer (SEEK_HOLE, through the host addon) where the store has one,
 * as qemu asks; otherwise by reading, at HOLE_GRANULARITY.
 */
export async function holeRuns(store: ByteStore, hostOffset: number, length: number): Promise<{ offset: number; length: number; zero: boolean }[]> {
  if (store.dataRuns) {
    const runs = await store.dataRuns(hostOffset, length);
    return runs.map((r) => ({ offset: r.offset - hostOffset, length: r.length, zero: !r.data }));
  }
  const out: { offset: number; length: number; zero: boolean }[] = [];
  const chunk = new Uint8Array(Math.min(length, 1 << 20));
  for (let done = 0; done < length; ) {
    const n = Math.min(chunk.length, length - done);
    const buf = chunk.subarray(0, n);
    await store.read(hostOffset + done, buf);
    for (let i = 0; i < n; ) {
      const at = hostOffset + done + i;
      const step = Math.min(n - i, HOLE_GRANULARITY - (at % HOLE_GRANULARITY));
      const zero = isZero(buf.subarray(i, i + step));
      const last = out[out.length - 1];
      if (last && last.zero === zero) last.length += step;
      else out.push({ offset: done + i, length: step, zero });
      i += step;
    }
    done += n;
  }
  return out;
}
