/**
 * Emptying a qcow2 image all at once, as QEMU's qcow2 does after a commit when it can
 * (make_completely_empty): instead of deallocating cluster by cluster, the image file is rebuilt
 * as a fresh image's: header, a one-cluster refcount table at cluster 1, its refcount block at
 * cluster 2, an empty L1 table from cluster 3, and the file cut after it.
 *
 * It can only when nothing else lives in the file: a version 3 image (it needs the dirty bit),
 * without internal snapshots, persistent bitmaps, a LUKS header or an external data file, whose
 * L1 table and the three clusters before it fit in what one refcount block counts.
 *
 * The order (and QEMU's blkdebug events, so its iotests can fail each step):
 *   1. the dirty bit is set (flushed): from here on the refcounts on disk may be wrong;
 *   2. `l1_update`: the L1 table is zeroed in place;
 *   3. `empty_image_prepare`: clusters 1 to 3 + L1 are zeroed (this may overwrite the old
 *      refcount structures and L1 table: the dirty bit covers it);
 *   4. `l1_update`, `reftable_update`: the header names the new L1 table and refcount table
 *      (flushed);
 *   5. `refblock_alloc`: the refcount table names its block (flushed);
 *   6. the first clusters are counted, the dirty bit cleared, the file cut.
 * A failure in steps 2 to 5 leaves an image that only the repair of the next open (it is dirty)
 * can make sense of: the caller must then drop everything it holds for the image (see
 * Qcow2Writer.makeEmpty), as QEMU ejects the node.
 */
import type { ByteStore } from '../../storage/types.js';
import { INCOMPAT_DIRTY } from './features.js';
import type { Qcow2Image } from './image.js';

/** Whether `image` can be emptied all at once (see above). */
export function canEmptyCompletely(image: Qcow2Image): boolean {
  const h = image.header;
  const cs = image.clusterSize;
  const l1Clusters = Math.ceil((h.l1Size * 8) / cs);
  const blockEntries = (cs * 8) / 2 ** h.refcountOrder;
  return h.version >= 3 && image.snapshots.length === 0 && !h.bitmaps && 3 + l1Clusters <= blockEntries && h.cryptMethod !== 2 && !image.external;
}

/** Zeros over [offset, +length) of the file: the store's zero range where it has one. */
async function zeroFill(store: ByteStore, offset: number, length: number): Promise<void> {
  if (store.zeroRange) return store.zeroRange(offset, length);
  await store.write(offset, new Uint8Array(length));
}

/** Which step failed (see above): from `broken` on, the file no longer matches what the caller holds. */
export class EmptyingFailed extends Error {
  constructor(
    readonly broken: boolean,
    readonly failure: unknown,
  ) {
    super('emptying failed');
  }
}

/**
 * Steps 1 to 5 (see above); the caller then loads the new refcount structures, counts the first
 * `metadataClusters` clusters and calls {@link finishEmptying}. Throws EmptyingFailed.
 */
export async function rebuildEmpty(image: Qcow2Image): Promise<{ metadataClusters: number }> {
  const { store } = image;
  const cs = image.clusterSize;
  const h = image.header;
  const l1Clusters = Math.ceil((h.l1Size * 8) / cs);
  try {
    await image.writeHeader((x) => {
      x.incompatibleFeatures |= INCOMPAT_DIRTY;
    });
    await store.flush();
  } catch (e) {
    throw new EmptyingFailed(false, e);
  }
  try {
    store.debugEvent?.('l1_update');
    await zeroFill(store, h.l1TableOffset, l1Clusters * cs);
    store.debugEvent?.('empty_image_prepare');
    await zeroFill(store, cs, (2 + l1Clusters) * cs);
    store.debugEvent?.('l1_update');
    store.debugEvent?.('reftable_update');
    await image.writeHeader((x) => {
      x.l1TableOffset = 3 * cs;
      x.refcountTableOffset = cs;
      x.refcountTableClusters = 1;
    });
    await store.flush();
    store.debugEvent?.('refblock_alloc');
    const entry = new Uint8Array(8);
    new DataView(entry.buffer).setBigUint64(0, BigInt(2 * cs));
    await store.write(cs, entry);
    await store.flush();
  } catch (e) {
    throw new EmptyingFailed(true, e);
  }
  return { metadataClusters: 3 + l1Clusters };
}

/** Step 6's end: the dirty bit cleared (the counts are on disk by now) and the file cut after the metadata. */
export async function finishEmptying(image: Qcow2Image, metadataClusters: number): Promise<void> {
  const { store } = image;
  await image.writeHeader((x) => {
    x.incompatibleFeatures &= ~INCOMPAT_DIRTY;
  });
  await store.flush();
  await store.truncate(metadataClusters * image.clusterSize);
  image.setFileSize(metadataClusters * image.clusterSize);
}
