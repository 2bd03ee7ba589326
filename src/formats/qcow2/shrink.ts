/**
 * Shrinking a QCOW2 image (qemu-img resize --shrink): the virtual size drops, every cluster at or
 * past the new end (rounded up to a cluster) loses its reference from the active tables, L1
 * entries past the new end are emptied (the L1 table keeps its length, as qemu keeps l1_size),
 * and the file is cut after the last cluster still in use.
 *
 * Crash-safety order (the writer's lock is held and its metadata flushed on entry):
 *   1. the header gets the new size (flushed): from then on nothing past the end is visible, and
 *      an image with table entries past its size is still a valid image;
 *   2. entries are cleared in the active tables through the writer's usual path (shared L2 tables
 *      are copied first, so snapshots keep their data); references are dropped through the
 *      deferred-free path, so counts only fall after the tables are on disk (flushLocked);
 *   3. only then is the file truncated, after the last cluster whose refcount is not zero.
 * A kill between any two steps leaves at most leaked clusters.
 */
import { l2EntryEmpty, readL2Entry } from './l2-entry.js';
import { l1TableOffset } from './l1-entry.js';
import type { Qcow2Device } from './qcow2.js';
import type { Qcow2Writer } from './write.js';

/** Shrink `dev` to `size` bytes. Runs inside `writer.exclusive` (see Qcow2Writer.resize). */
export async function shrinkLocked(dev: Qcow2Device, w: Qcow2Writer, size: number): Promise<void> {
  const g = dev.geometry;
  const cs = dev.clusterSize;
  const oldSize = dev.size;
  const h = dev.header;

  // 1. The new size, durable before anything it hides is taken away.
  h.size = size;
  await w.writeHeader();
  await dev.store.flush();
  dev.size = size;

  // 2. Clusters from the first whole cluster past the end onwards.
  const firstGone = Math.ceil(size / cs) * cs;
  const keptL1 = Math.ceil(size / g.l2Coverage);
  // The partly kept table: clear its entries past the end.
  if (keptL1 > 0 && firstGone < Math.min(oldSize, keptL1 * g.l2Coverage)) {
    const table = await w.l2ForWrite(firstGone, false);
    if (table) {
      const end = Math.min(keptL1 * g.l2Coverage, Math.ceil(oldSize / cs) * cs);
      for (let c = firstGone; c < end; c += cs) {
        const k = (c % g.l2Coverage) / cs;
        if (l2EntryEmpty(table.data, k, g.l2EntryBytes)) continue;
        const d = readL2Entry(table.data, k, dev.l2Context);
        w.setEntry(table, k, 0n, g.extendedL2 ? 0n : undefined);
        w.release(d);
      }
      await dev.l2Cache.put(table.offset, table.data, true);
    }
  }
  // Whole tables past the end: the active image's path to the table and to its data goes away
  // (the table itself and each data cluster lose one reference, shared with a snapshot or not).
  for (let i = keptL1; i < dev.l1Entries; i++) {
    const off = l1TableOffset(dev.l1, i);
    if (off === 0) continue;
    const table = await dev.l2Cache.get(off);
    for (let k = 0; k < g.l2Entries; k++) {
      if (l2EntryEmpty(table.data, k, g.l2EntryBytes)) continue;
      w.release(readL2Entry(table.data, k, dev.l2Context));
    }
    dev.l2Cache.drop(off);
    w.setL1Entry(i, 0, false);
    w.refcounts.free(off, cs);
  }
  // Tables, then L1, then the counts drop (flushLocked keeps that order).
  await w.flushLocked();

  // 3. Cut the file after the last cluster in use.
  const rc = w.refcounts;
  let last = Math.max(rc.end, Math.ceil(dev.fileSize / cs)) - 1;
  while (last > 0 && (await rc.get(last)) === 0) last--;
  const keep = (last + 1) * cs;
  const current = await dev.store.size();
  if (keep < current) {
    await dev.store.truncate(keep);
    await dev.store.flush();
    dev.fileSize = keep;
  }
}

