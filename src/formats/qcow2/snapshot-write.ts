/**
 * Internal snapshots, written: create (copy the active L1, +1 on everything it reaches), apply
 * (+1 on the snapshot's tree, the active L1 becomes a copy of the snapshot's, -1 on the old tree)
 * and delete (drop the entry, -1 on its tree). Afterwards the active tables' COPIED flags are
 * recomputed from the new counts.
 *
 * Crash-safety order, as for guest writes: increments are written (and flushed) before anything
 * on disk references them; the snapshot table is written whole before the header names it; a
 * table or tree is decremented only after nothing on disk references it any more. A kill at any
 * point leaves leaks at worst.
 */
import { isZero } from '../../core/bytes.js';
import { QcowError, unsupported } from '../../core/errors.js';
import { checkSnapshotL1, encodeSnapshotTable, findSnapshot, storedSnapshotTableLength, type Qcow2Snapshot } from './snapshot-table.js';
import { l2EntryCopied, readL2Entry, setL2Copied } from './l2-entry.js';
import { l1EntryCopied, l1TableOffset } from './l1-entry.js';
import { MAX_SNAPSHOTS } from './layout.js';
import { entriesPerBlock } from './refcount.js';
import type { Qcow2Writer } from './write.js';
import type { ByteStore } from '../../storage/types.js';
import type { Qcow2DeviceParts } from './device-parts.js';

/**
 * What the snapshot writer needs of the device. The device loads this module when a snapshot
 * changes, so this module names the parts it uses rather than importing the device back.
 */
export interface SnapshotDevice extends Qcow2DeviceParts {
  readonly dataStore: ByteStore;
  readonly snapshots: readonly Qcow2Snapshot[];
  readonly writer: Qcow2Writer | null;
}

function writerOf(dev: SnapshotDevice): Qcow2Writer {
  const w = dev.requireWriter();
  if (dev.dataStore !== dev.store) throw unsupported('Operation not supported: internal snapshots with an external data file');
  return w;
}

/** Our messages when a tree's counts cannot be changed (the CLI names the snapshot action before them). */
export const NO_REFCOUNT_BLOCK = 'no refcount block covers cluster';
export const REFTABLE_LIMIT = 'refcount table would exceed 8 MiB';

export async function createSnapshot(dev: SnapshotDevice, name: string): Promise<Qcow2Snapshot> {
  const w = writerOf(dev);
  return w.exclusive(async () => {
    if (dev.snapshots.some((s) => s.name === name)) throw new QcowError('QCOW_INVALID_ARGUMENT', `Snapshot with name '${name}' already exists`);
    if (dev.snapshots.length >= MAX_SNAPSHOTS) throw new QcowError('QCOW_UNSUPPORTED', `Could not create snapshot '${name}': the image has ${dev.snapshots.length} snapshots, the most a qcow2 image can have`);
    const rc = w.refcounts;
    const cs = dev.clusterSize;
    // The snapshot's own copy of the L1 table, written before the tree's counts go up, in QEMU's
    // order: when a count would overflow (narrow refcount_bits, or a 64-bit count at 2^64 - 1) the
    // increments are taken back and the copy stays allocated, one leaked cluster, as qemu-img
    // leaves it (its check then reports the same leak).
    const l1Copy = dev.l1.slice();
    const l1At = l1Copy.length > 0 ? await rc.allocClusters(Math.ceil(l1Copy.length / cs)) : 0;
    if (l1Copy.length > 0) await dev.store.write(l1At, l1Copy);
    await adjustTree(dev, dev.l1, dev.l1Entries, 1);
    const now = Date.now();
    const id = String(dev.snapshots.reduce((m, s) => Math.max(m, Number.parseInt(s.id, 10) || 0), 0) + 1);
    const snap: Qcow2Snapshot = {
      l1TableOffset: l1At,
      l1Size: dev.l1Entries,
      id,
      name,
      dateSec: Math.floor(now / 1000),
      dateNsec: (now % 1000) * 1e6,
      vmClockNsec: 0,
      vmStateSize: 0,
      diskSize: dev.size,
      icount: 0n,
      extraUnknown: new Uint8Array(0),
    };
    await replaceSnapshotTable(dev, w, [...dev.snapshots, snap]);
    await refreshCopied(dev, w);
    return snap;
  });
}

export async function deleteSnapshot(dev: SnapshotDevice, spec: string): Promise<void> {
  const w = writerOf(dev);
  await w.exclusive(async () => {
    const snap = findSnapshot(dev.snapshots, spec);
    // Its L1 table is validated (and read) before the entry goes, as QEMU does: a snapshot whose
    // table QEMU refuses stays listed.
    const l1 = await readTable(dev, snap);
    await replaceSnapshotTable(dev, w, dev.snapshots.filter((s) => s !== snap));
    // The entry is gone: a failure from here on leaks the snapshot's clusters, as QEMU's does.
    try {
      // The clusters only the snapshot held are punched (pass-discard-snapshot), as in QEMU.
      await w.dropCounts('snapshot', async () => {
        await adjustTree(dev, l1, snap.l1Size, -1);
        if (snap.l1Size > 0) await w.refcounts.update(snap.l1TableOffset, snap.l1Size * 8, -1);
      });
      await w.writeRefcounts();
    } catch (e) {
      if (!(e instanceof QcowError && e.code === 'QCOW_IO')) throw e;
      throw new QcowError('QCOW_IO', `Failed to free the cluster and L1 table: ${ioReason(e)}`, { file: e.file, errno: e.errno, cause: e });
    }
    await refreshCopied(dev, w);
  });
}

export async function applySnapshot(dev: SnapshotDevice, spec: string): Promise<void> {
  const w = writerOf(dev);
  await w.exclusive(async () => {
    // As QEMU 7.2 (bdrv_snapshot_goto): any persistent bitmap, enabled or not, consistent or not,
    // blocks a revert, since the disk would change under it without a write it could record. It
    // is checked before the snapshot is looked up, in QEMU's order.
    const bitmaps = w.bitmaps.list();
    if (bitmaps.length > 0) {
      const names = bitmaps.slice(0, 3).map((b) => `'${b.name}'`).join(', ') + (bitmaps.length > 3 ? `, and ${bitmaps.length - 3} more` : '');
      throw unsupported(`Could not apply snapshot '${spec}': the image has persistent dirty bitmaps (${names}); remove them first`);
    }
    const snap = findSnapshot(dev.snapshots, spec);
    const rc = w.refcounts;
    const cs = dev.clusterSize;
    const snapL1 = await readTable(dev, snap);
    await adjustTree(dev, snapL1, snap.l1Size, 1);
    await w.writeRefcounts();
    await dev.store.flush();
    const { image, map } = dev;
    const oldL1 = map.l1.slice();
    const oldEntries = map.l1Entries;
    const oldOffset = image.header.l1TableOffset;
    // The active L1 becomes the snapshot's; a bigger one needs a new place.
    let l1: Uint8Array;
    let l1At = oldOffset;
    if (snap.l1Size > oldEntries) {
      l1 = snapL1.slice();
      l1At = await rc.allocClusters(Math.ceil(l1.length / cs));
      await w.writeRefcounts();
    } else {
      l1 = new Uint8Array(oldL1.length);
      l1.set(snapL1);
    }
    await image.store.write(l1At, l1);
    await image.store.flush();
    map.replaceL1(l1);
    await image.writeHeader((h) => {
      h.l1TableOffset = l1At;
      h.l1Size = l1.length / 8;
      if (snap.diskSize !== undefined) h.size = snap.diskSize;
    });
    if (snap.diskSize !== undefined) image.setSize(snap.diskSize);
    await image.store.flush();
    // Nothing on disk references the old tree through the active L1 any more.
    map.l2Cache.clear();
    await adjustTree(dev, oldL1, oldEntries, -1);
    if (l1At !== oldOffset && oldEntries > 0) await rc.update(oldOffset, oldEntries * 8, -1);
    await w.writeRefcounts();
    await refreshCopied(dev, w);
  });
}

async function readTable(dev: SnapshotDevice, snap: Qcow2Snapshot): Promise<Uint8Array> {
  checkSnapshotL1(snap, dev.clusterSize);
  const b = new Uint8Array(snap.l1Size * 8);
  if (snap.l1Size > 0) await dev.store.read(snap.l1TableOffset, b);
  return b;
}

/**
 * Add `delta` to the count of every L2 table and data cluster an L1 table reaches. All or
 * nothing: if a counter would overflow (narrow refcount_bits), what was added is taken back.
 */
async function adjustTree(dev: SnapshotDevice, l1: Uint8Array, entries: number, delta: number): Promise<void> {
  const done: Array<[number, number]> = [];
  const writer = dev.writer!;
  const cs = dev.clusterSize;
  const perBlock = entriesPerBlock(cs, 2 ** dev.image.header.refcountOrder);
  const rc = {
    update: async (off: number, len: number, d: number) => {
      // A tree naming clusters no refcount block covers (a corrupt entry past the end of the
      // file): QEMU's update of their counts makes the block and then fails with EAGAIN, leaving
      // the snapshot undone. Refused here before anything is made.
      const table = writer.refcounts.blockOffsets();
      for (let b = Math.floor(off / cs / perBlock); b <= Math.floor((off + len - 1) / cs / perBlock); b++) {
        if (!((table[b] ?? 0) > 0)) throw new QcowError('QCOW_CORRUPT', `${NO_REFCOUNT_BLOCK} 0x${Math.max(off, b * perBlock * cs).toString(16)}`);
      }
      await writer.refcounts.update(off, len, d);
      done.push([off, len]);
    },
  };
  try {
    await adjustTreeSteps(dev, rc, l1, entries, delta);
  } catch (e) {
    for (const [off, len] of done.reverse()) await writer.refcounts.update(off, len, -delta);
    throw e;
  }
}

async function adjustTreeSteps(
  dev: SnapshotDevice,
  rc: { update(off: number, len: number, d: number): Promise<void> },
  l1: Uint8Array,
  entries: number,
  delta: number,
): Promise<void> {
  const cs = dev.clusterSize;
  const l2 = new Uint8Array(cs);
  // Data clusters that follow each other in the file are updated as one run: one call per run
  // instead of one per cluster (a 1 GiB image of 4 KiB clusters has 262 144 of them).
  let runStart = 0;
  let runLength = 0;
  const flush = async () => {
    if (runLength > 0) await rc.update(runStart, runLength, delta);
    runLength = 0;
  };
  for (let i = 0; i < entries; i++) {
    const off = l1TableOffset(l1, i);
    if (off === 0) continue;
    await rc.update(off, cs, delta);
    await dev.store.read(off, l2);
    for (let j = 0; j < dev.geometry.l2Entries; j++) {
      // Unallocated entries (all zero) reference nothing.
      if (l2[j * dev.geometry.l2EntryBytes] === 0 && isZero(l2.subarray(j * dev.geometry.l2EntryBytes, j * dev.geometry.l2EntryBytes + 8))) continue;
      let d;
      try {
        d = readL2Entry(l2, j, dev.l2Context);
      } catch (e) {
        // A cluster at or past 2^53 is past what any refcount table QEMU holds can count: its
        // update fails for the table's size (EFBIG), as the allocator's growth past 8 MiB does.
        if (e instanceof QcowError && /host offset is beyond 2\^53/.test(e.message)) throw new QcowError('QCOW_UNSUPPORTED', `${REFTABLE_LIMIT}: ${e.message}`);
        throw e;
      }
      if (d.kind === 'compressed') {
        // Compressed clusters may share host clusters: each one counts on its own.
        await flush();
        await rc.update(d.hostOffset, d.compressedBound, delta);
      } else if (d.kind === 'normal' || d.kind === 'zero-alloc') {
        if (runLength > 0 && runStart + runLength === d.hostOffset) runLength += cs;
        else {
          await flush();
          runStart = d.hostOffset;
          runLength = cs;
        }
      }
    }
  }
  await flush();
}

/** COPIED exactly where the count is 1, in the active L1 and the L2 tables it names. */
async function refreshCopied(dev: SnapshotDevice, w: Qcow2Writer): Promise<void> {
  const rc = w.refcounts;
  const cs = dev.clusterSize;
  const size = dev.geometry.l2EntryBytes;
  const map = dev.map;
  for (let i = 0; i < map.l1Entries; i++) {
    const off = l1TableOffset(map.l1, i);
    if (off === 0) continue;
    const one = (rc.peek(off / cs) ?? (await rc.get(off / cs))) === 1;
    if (one !== l1EntryCopied(map.l1, i)) map.setL1Copied(i, one);
    // Slice by slice, as the L2 cache holds them.
    for (let s = 0; s < cs; s += map.slice.bytes) {
      const table = await map.l2Cache.getForWrite(off + s);
      let changed = false;
      for (let j = 0; j < map.slice.entries; j++) {
        const d = readL2Entry(table.data, j, dev.l2Context);
        if (d.kind !== 'normal' && d.kind !== 'zero-alloc') continue;
        // Counts of cached refcount blocks are read without an await (most of them, in order).
        const single = (rc.peek(d.hostOffset / cs) ?? (await rc.get(d.hostOffset / cs))) === 1;
        if (single !== l2EntryCopied(d)) {
          setL2Copied(table.data, j, size, single);
          changed = true;
        }
      }
      if (changed) await map.tableChanged(table);
    }
  }
}

/**
 * The snapshot table written anew with every entry in full (amend's upgrade to version 3 needs
 * the extra data version 2 entries may lack). The caller holds the writer exclusively.
 */
export async function rewriteSnapshotTable(dev: SnapshotDevice, w: Qcow2Writer): Promise<void> {
  await replaceSnapshotTable(dev, w, [...dev.snapshots]);
}

/** Write a new snapshot table, point the header at it, then free the old one. */
async function replaceSnapshotTable(dev: SnapshotDevice, w: Qcow2Writer, snaps: Qcow2Snapshot[]): Promise<void> {
  const rc = w.refcounts;
  const cs = dev.clusterSize;
  const bytes = encodeSnapshotTable(snaps);
  const at = bytes.length > 0 ? await rc.allocClusters(Math.ceil(bytes.length / cs)) : 0;
  if (bytes.length > 0) await dev.store.write(at, bytes);
  await w.writeRefcounts();
  await dev.store.flush();
  const image = dev.image;
  const oldOffset = image.header.snapshotsOffset;
  const oldLength = storedSnapshotTableLength(image.snapshots);
  await image.writeHeader((h) => {
    h.nbSnapshots = snaps.length;
    h.snapshotsOffset = at;
  });
  await image.store.flush();
  // Every entry is now on disk as encodeSnapshotTable writes it.
  for (const s of snaps) delete s.storedExtraSize;
  image.setSnapshots(snaps);
  // The old table's clusters are freed; a table the header placed past the end of the file (read
  // as zeros) has no clusters there to free. QEMU tries, fails and says so (and goes on).
  const freeable = Math.min(oldLength, Math.max(0, image.fileSize - oldOffset));
  if (oldOffset !== 0 && freeable < oldLength) {
    const why = await rc.whyFreeFails?.(Math.floor((oldOffset + freeable) / cs));
    if (why !== undefined) dev.onWarning?.(`qcow2_free_clusters failed: ${why}`);
  }
  if (freeable > 0 && oldOffset !== 0) {
    // As QEMU's free: an I/O failure (loading or writing the refcounts) is said, the counts stay
    // as they were (the clusters leak) and the deletion goes on. Punched when no longer used
    // (pass-discard-snapshot), as QEMU frees it.
    dev.store.debugEvent?.('cluster_free');
    let applied = false;
    try {
      await w.dropCounts('snapshot', () => rc.update(oldOffset, freeable, -1));
      applied = true;
      await w.writeRefcounts();
    } catch (e) {
      if (!(e instanceof QcowError && e.code === 'QCOW_IO')) throw e;
      if (applied) await rc.update(oldOffset, freeable, 1);
      dev.onWarning?.(`qcow2_free_clusters failed: ${ioReason(e)}`);
    }
    return;
  }
  await w.writeRefcounts();
}

/** An I/O failure in strerror's words where the error carries an errno (its message then is those words). */
function ioReason(e: QcowError): string {
  return e.errno !== undefined ? e.message : 'Input/output error';
}
