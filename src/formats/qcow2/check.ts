/**
 * `check` for qcow2, as `qemu-img check` does it: count the references every cluster of the file
 * receives (header, L1/L2 tables and data of the active image and of every snapshot, snapshot
 * table, refcount table and blocks, LUKS area, bitmap directory and tables), compare them with the
 * stored refcounts, and check the COPIED flags of the active tables.
 *   - stored > referenced: a leak (wasted space, harmless);
 *   - stored < referenced: a corruption (a write could reuse a live cluster);
 *   - COPIED set where the refcount is not 1, or missing where it is: a corruption;
 *   - table entries that are misaligned or point outside the file: corruptions.
 * Repair (`leaks` or `all`) writes the counts found (and, for `all`, the right COPIED flags), then
 * checks again; the result reports what was fixed and what is left, with qemu-img's keys.
 * Works on the store directly, so images the device refuses to open (corrupt bit) can be checked.
 */
import { QcowError, corrupt, unsupported } from '../../core/errors.js';
import { firstNonZero, isZero, u64big } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';
import { HEADER_PROBE_BYTES, decodeHeader, peekClusterBits, type Qcow2Header } from './header.js';
import { INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, checkIncompatibleFeatures, hasFeature } from './features.js';
import { qcow2Geometry, type Qcow2Geometry } from './layout.js';
import { contiguousEntries, decodeL2Entry, readL2Entry, type L2Context } from './l2-entry.js';
import { encodeSnapshotTable, readSnapshotTable } from './snapshot-table.js';
import { Refcounts } from './alloc.js';
import { ClusterRefs } from './cluster-refs.js';
import { getRefcount } from './refcount.js';
import { encodeHeader } from './header.js';

const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
const COPIED = 1n << 63n;

export type RepairMode = 'leaks' | 'all';

export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** One line per finding, worded as qemu-img words them (it prints them on stderr). */
  messages: string[];
}

interface Walk {
  h: Qcow2Header;
  g: Qcow2Geometry;
  ctx: L2Context;
  cs: number;
  fileSize: number;
  refs: ClusterRefs;
  res: CheckResult;
  /** Active-table entries whose COPIED flag is wrong: [table offset, byte offset in table, entry]. */
  badCopied: Array<{ table: number; at: number; entry: bigint; want: boolean }>;
  external: boolean;
}

/** Check (and optionally repair) the image in `store`. Throws only when the header is unreadable. */
export async function checkQcow2(store: ByteStore, options: { repair?: RepairMode } = {}): Promise<CheckResult> {
  const first = await scan(store);
  if (!options.repair) return first.res;
  const fixable = first.res.leaks > 0 || (options.repair === 'all' && first.res.corruptions > 0);
  if (!fixable) return first.res;
  const fixed = await repair(store, first, options.repair);
  const again = await scan(store);
  again.res.leaksFixed = fixed.leaks;
  again.res.corruptionsFixed = fixed.corruptions;
  again.res.messages = [...first.res.messages, ...fixed.messages, ...again.res.messages];
  return again.res;
}

async function readHeader(store: ByteStore): Promise<{ h: Qcow2Header; fileSize: number }> {
  const fileSize = await store.size();
  const head = new Uint8Array(Math.min(HEADER_PROBE_BYTES, fileSize));
  await store.read(0, head);
  const bits = peekClusterBits(head);
  const firstCluster = new Uint8Array(Math.min(2 ** bits, fileSize));
  await store.read(0, firstCluster);
  const h = decodeHeader(firstCluster);
  // Refuse what opening refuses, as qemu-img check does: a check cannot judge an image whose
  // features it does not understand.
  checkIncompatibleFeatures(h);
  if (h.cryptMethod > 2) throw unsupported(`qcow2 header: unknown encryption method ${h.cryptMethod}`);
  if (h.version === 2 && h.refcountOrder !== 4) throw corrupt('qcow2 v2 header: refcount_order must be 4');
  return { h, fileSize };
}

async function scan(store: ByteStore): Promise<Walk & { rc: Refcounts | null }> {
  const { h, fileSize } = await readHeader(store);
  const g = qcow2Geometry(h.clusterBits, hasFeature(h.incompatibleFeatures, INCOMPAT_EXTL2));
  const cs = g.clusterSize;
  const external = hasFeature(h.incompatibleFeatures, INCOMPAT_DATA_FILE);
  const res: CheckResult = {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: Math.ceil(h.size / cs),
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    messages: [],
  };
  const w: Walk = { h, g, ctx: { clusterBits: h.clusterBits, extendedL2: g.extendedL2, externalDataFile: external }, cs, fileSize, refs: new ClusterRefs(Math.ceil(fileSize / cs)), res, badCopied: [], external };
  const error = (m: string) => {
    res.corruptions++;
    res.messages.push(m);
  };

  ref(w, 0, cs);
  // Refcount structures, read through the allocator's codec.
  let rc: Refcounts | null = null;
  try {
    rc = await Refcounts.load(store, { clusterSize: cs, refcountBits: 2 ** h.refcountOrder, tableOffset: h.refcountTableOffset, tableClusters: h.refcountTableClusters });
    ref(w, h.refcountTableOffset, h.refcountTableClusters * cs);
    rc.blockOffsets().forEach((off, i) => {
      if (off === 0) return;
      if (off >= fileSize) error(`ERROR refcount block ${i} is outside image`);
      else ref(w, off, cs);
    });
  } catch (e) {
    error(`ERROR refcount table: ${(e as Error).message}`);
  }

  // Active L1 (with fragmentation statistics and COPIED checks), then every snapshot.
  await walkL1(store, w, h.l1TableOffset, h.l1Size, true, error);
  if (h.nbSnapshots > 0) {
    try {
      const snaps = await readSnapshotTable(store, h.nbSnapshots, h.snapshotsOffset, fileSize);
      ref(w, h.snapshotsOffset, encodeSnapshotTable(snaps).length);
      for (const s of snaps) await walkL1(store, w, s.l1TableOffset, s.l1Size, false, error);
    } catch (e) {
      error(`ERROR snapshot table: ${(e as Error).message}`);
    }
  }
  if (h.fde) ref(w, h.fde.offset, h.fde.length);
  if (h.bitmaps && h.bitmaps.nbBitmaps > 0) await walkBitmaps(store, w, error);

  // Compare stored counts with references, one refcount block at a time.
  if (rc) {
    const stored = await compareCounts(store, w, rc, error);
    // COPIED flags (need the stored counts): checked on the active tables only.
    await checkCopied(store, w, stored, rc, error);
  }
  res.imageEndOffset = (w.refs.highest + 1) * cs;
  return { ...w, rc };
}

/**
 * Stored counts against references, for every cluster of the file or referenced. Returns each
 * file cluster's stored count as 0, 1 or 2 (= more), which the COPIED check needs.
 */
async function compareCounts(store: ByteStore, w: Walk, rc: Refcounts, error: (m: string) => void): Promise<Uint8Array> {
  const { cs, fileSize, refs, res } = w;
  const fileClusters = Math.ceil(fileSize / cs);
  const storedState = new Uint8Array(fileClusters);
  const offsets = rc.blockOffsets();
  // The clusters of the file and whatever is referenced beyond it, as qemu-img counts: counts
  // stored for clusters past both (the rest of the last refcount block) are not looked at.
  const limit = Math.max(fileClusters, refs.highest + 1);
  const bits = rc.refcountBits;
  const block = new Uint8Array(cs);
  const report = (c: number, stored: number, found: number) => {
    if (stored < found) error(`ERROR cluster ${c} refcount=${stored} reference=${found}`);
    else {
      res.leaks++;
      res.messages.push(`Leaked cluster ${c} refcount=${stored} reference=${found}`);
    }
  };
  // Past the refcount table there are no stored counts: only references, few and kept apart
  // (a corrupt entry may point anywhere: no block-by-block walk up to it).
  const tableEnd = Math.min(limit, offsets.length * rc.perBlock);
  for (let b = 0; b * rc.perBlock < tableEnd; b++) {
    const first = b * rc.perBlock;
    const end = Math.min(tableEnd, first + rc.perBlock);
    const boff = offsets[b] ?? 0;
    if (boff === 0 || boff >= fileSize) {
      // No block (or one outside the file): every count here reads 0.
      if (!refs.anyIn(first, end)) continue;
      for (let c = first; c < end; c++) {
        const found = refs.get(c);
        if (found !== 0) report(c, 0, found);
      }
      continue;
    }
    await store.read(boff, block.subarray(0, Math.min(cs, fileSize - boff)));
    if (boff + cs > fileSize) block.fill(0, fileSize - boff);
    // The default width, read as byte pairs in place (a call per cluster otherwise: every
    // cluster of the image passes here).
    const wide = bits === 16;
    for (let c = first; c < end; c++) {
      const i = c - first;
      const stored = wide ? (block[2 * i]! << 8) | block[2 * i + 1]! : getRefcount(block, i, bits);
      if (c < fileClusters) storedState[c] = stored > 2 ? 2 : stored;
      const found = refs.get(c);
      if (stored !== found) report(c, stored, found);
    }
  }
  for (const [c, found] of refs.countsFrom(tableEnd)) report(c, 0, found);
  return storedState;
}

/**
 * One more reference to every cluster of [offset, +length). As qemu-img check, a region reaching
 * a whole cluster or more past the end of the file is a corruption and is not counted (so the
 * counts stay bounded by the file, whatever a corrupt table says).
 */
function ref(w: Walk, offset: number, length: number, error?: (m: string) => void): void {
  if (length <= 0) return;
  if (offset + length - w.fileSize >= w.cs) {
    const m = `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${length.toString(16)}`;
    if (error) error(m);
    else {
      w.res.corruptions++;
      w.res.messages.push(m);
    }
    return;
  }
  w.refs.addRange(Math.floor(offset / w.cs), Math.floor((offset + length - 1) / w.cs));
}

async function readL1(store: ByteStore, w: Walk, offset: number, entries: number): Promise<Uint8Array | null> {
  if (entries === 0) return new Uint8Array(0);
  if (offset % w.cs !== 0 || offset + entries * 8 > w.fileSize) return null;
  const b = new Uint8Array(entries * 8);
  await store.read(offset, b);
  return b;
}

async function walkL1(store: ByteStore, w: Walk, l1Offset: number, l1Size: number, active: boolean, error: (m: string) => void): Promise<void> {
  const l1 = await readL1(store, w, l1Offset, l1Size);
  if (!l1) {
    error(`ERROR: L1 table at 0x${l1Offset.toString(16)} (${l1Size} entries) is invalid or outside the image`);
    return;
  }
  ref(w, l1Offset, l1Size * 8);
  const dv = new DataView(l1.buffer);
  const l2 = new Uint8Array(w.cs);
  const scratch = readL2Entry(new Uint8Array(16), 0, w.ctx); // reused for every entry
  for (let i = 0; i < l1Size; i++) {
    const e = dv.getBigUint64(i * 8);
    const off = Number(e & OFFSET_MASK);
    if (off === 0) continue;
    if (off % w.cs !== 0) {
      error(`ERROR l2_offset=${off.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
      continue;
    }
    if (off + w.cs > w.fileSize) {
      error(`ERROR l2_offset=${off.toString(16)}: L2 table is outside the image`);
      continue;
    }
    ref(w, off, w.cs);
    await store.read(off, l2);
    // Fragmentation counts within each L2 table, as qemu-img counts it: a table's first data
    // cluster is not fragmented for being away from the previous table's last.
    let next = 0;
    const eb = w.g.l2EntryBytes;
    for (let j = 0; j < w.g.l2Entries; j++) {
      // All-zero entries (unallocated, most of a sparse table) reference nothing.
      if (l2[j * eb] === 0 && isZero(l2.subarray(j * eb, (j + 1) * eb))) continue;
      let d;
      try {
        d = decodeL2Entry(l2, j, w.ctx, scratch);
      } catch (err) {
        error(`ERROR L2 entry ${j} of table 0x${off.toString(16)}: ${(err as Error).message}`);
        continue;
      }
      if (d.kind === 'compressed') {
        if (d.hostOffset >= w.fileSize) error(`ERROR compressed cluster at 0x${d.hostOffset.toString(16)} is outside the image`);
        else ref(w, d.hostOffset, d.compressedBound);
        if (active) {
          w.res.allocatedClusters++;
          w.res.compressedClusters++;
          w.res.fragmentedClusters++;
        }
        continue;
      }
      if (d.kind !== 'normal' && d.kind !== 'zero-alloc') continue;
      if (d.kind === 'normal' && eb === 8 && !w.external && d.hostOffset < w.fileSize) {
        // The entries after this one that continue it in the file (an allocated image is one such
        // run per table), taken in one step: each would count as allocated, not fragmented, and
        // one reference to its cluster. Only those inside the file: the rest are reported one by one.
        const inFile = Math.ceil((w.fileSize - d.hostOffset) / w.cs);
        const n = contiguousEntries(l2, j, Math.min(w.g.l2Entries - j, inFile), w.cs) - j;
        if (active) {
          w.res.allocatedClusters += n;
          if (next !== 0 && d.hostOffset !== next) w.res.fragmentedClusters++;
          next = d.hostOffset + n * w.cs;
        }
        ref(w, d.hostOffset, n * w.cs);
        j += n - 1;
        continue;
      }
      if (active) {
        w.res.allocatedClusters++;
        if (next !== 0 && d.hostOffset !== next) w.res.fragmentedClusters++;
        next = d.hostOffset + w.cs;
      }
      if (w.external) continue;
      // A cluster past the end of the file gets qemu-img's message from ref(), and no count.
      ref(w, d.hostOffset, w.cs);
    }
  }
}

/**
 * COPIED must be set exactly where the stored refcount is 1, in the active L1 and its L2 tables.
 * `stored` is each file cluster's stored count as 0, 1 or 2+ (tables and data clusters past the
 * end of the file were reported already).
 */
async function checkCopied(store: ByteStore, w: Walk, stored: Uint8Array, rc: Refcounts, error: (m: string) => void): Promise<void> {
  const l1 = await readL1(store, w, w.h.l1TableOffset, w.h.l1Size);
  if (!l1) return;
  const l2 = new Uint8Array(w.cs);
  const scratch = readL2Entry(new Uint8Array(16), 0, w.ctx); // reused for every entry
  const eb = w.g.l2EntryBytes;
  for (let i = 0; i < w.h.l1Size; i++) {
    const off = Number(u64big(l1, i * 8) & OFFSET_MASK);
    if (off === 0 || off % w.cs !== 0 || off + w.cs > w.fileSize) continue;
    const rcount = stored[off / w.cs]!;
    // COPIED is bit 63: the top bit of the entry's first byte.
    if ((rcount === 1) !== ((l1[i * 8]! & 0x80) !== 0)) {
      const e = u64big(l1, i * 8);
      error(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${e.toString(16)} refcount=${rcount}`);
      w.badCopied.push({ table: w.h.l1TableOffset, at: i * 8, entry: e, want: rcount === 1 });
    }
    await store.read(off, l2);
    for (let j = Math.floor(firstNonZero(l2) / eb); j < w.g.l2Entries; j++) {
      // Unallocated entries (all zero), most of a sparse table, have no COPIED flag to check.
      if (l2[j * eb] === 0 && isZero(l2.subarray(j * eb, j * eb + 8))) continue;
      let d;
      try {
        d = decodeL2Entry(l2, j, w.ctx, scratch);
      } catch {
        continue;
      }
      if ((d.kind !== 'normal' && d.kind !== 'zero-alloc') || w.external) continue;
      const c = d.hostOffset / w.cs;
      if (c >= stored.length) {
        // A cluster past the end of the file (reported already): qemu-img still checks its flag
        // against the count the refcount structure gives it (0 past the table), unless that
        // count cannot be read.
        let r: number;
        try {
          r = rc.peek(c) ?? (await rc.get(c));
        } catch {
          continue;
        }
        if ((r === 1) !== ((l2[j * eb]! & 0x80) !== 0)) {
          const entry = u64big(l2, j * eb);
          error(`ERROR OFLAG_COPIED data cluster: l2_entry=${entry.toString(16)} refcount=${r}`);
          w.badCopied.push({ table: off, at: j * eb, entry, want: r === 1 });
        }
        continue;
      }
      // A run of entries continuing this one shares its flags: each is checked against its own
      // cluster's count without being decoded again.
      const n = d.kind === 'normal' && eb === 8 ? contiguousEntries(l2, j, Math.min(w.g.l2Entries - j, stored.length - c), w.cs) - j : 1;
      const copied = (l2[j * eb]! & 0x80) !== 0;
      for (let k = 0; k < n; k++) {
        const r = stored[c + k]!;
        if ((r === 1) !== copied) {
          const entry = u64big(l2, (j + k) * eb);
          error(`ERROR OFLAG_COPIED data cluster: l2_entry=${entry.toString(16)} refcount=${r}`);
          w.badCopied.push({ table: off, at: (j + k) * eb, entry, want: r === 1 });
        }
      }
      j += n - 1;
    }
  }
}

/** Bitmap directory and each bitmap's table and data clusters. */
async function walkBitmaps(store: ByteStore, w: Walk, error: (m: string) => void): Promise<void> {
  const ext = w.h.bitmaps!;
  if (ext.directoryOffset + ext.directorySize > w.fileSize) {
    error('ERROR bitmap directory is outside the image');
    return;
  }
  ref(w, ext.directoryOffset, ext.directorySize);
  const dir = new Uint8Array(ext.directorySize);
  await store.read(ext.directoryOffset, dir);
  const dv = new DataView(dir.buffer);
  let pos = 0;
  for (let i = 0; i < ext.nbBitmaps && pos + 24 <= dir.length; i++) {
    const tableOffset = Number(dv.getBigUint64(pos));
    const tableSize = dv.getUint32(pos + 8);
    const nameSize = dv.getUint16(pos + 18);
    const extra = dv.getUint32(pos + 20);
    if (tableOffset !== 0 && tableOffset + tableSize * 8 <= w.fileSize) {
      ref(w, tableOffset, tableSize * 8);
      const t = new Uint8Array(tableSize * 8);
      await store.read(tableOffset, t);
      for (let k = 0; k < tableSize; k++) {
        const entry = u64big(t, k * 8) & OFFSET_MASK;
        if (entry === 0n) continue;
        // ref()'s rule (a cluster starting at or past the end of the file), in BigInt: past 2^53
        // a number is not exact, and the message shows the entry's own value.
        if (entry >= BigInt(w.fileSize)) error(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${entry.toString(16)} size 0x${w.cs.toString(16)}`);
        else ref(w, Number(entry), w.cs);
      }
    }
    pos += Math.ceil((24 + extra + nameSize) / 8) * 8;
  }
}

/** Write the counts found (leaks: only lowering; all: raising too) and fix COPIED flags. */
async function repair(store: ByteStore, w: Walk & { rc: Refcounts | null }, mode: RepairMode): Promise<{ leaks: number; corruptions: number; messages: string[] }> {
  const rc = w.rc;
  if (!rc) throw new QcowError('QCOW_CORRUPT', 'the refcount table is unreadable; it cannot be repaired');
  if (store.readOnly) throw new QcowError('QCOW_READ_ONLY', 'cannot repair an image opened read-only');
  // Repairs write counts into the refcount blocks the table names: one outside the file would be
  // written there (a sparse file of terabytes, from a corrupt entry). qemu-img rebuilds the whole
  // refcount structure then; we do not, and refuse before writing anything.
  if (w.h.refcountTableOffset + w.h.refcountTableClusters * w.cs > w.fileSize) {
    throw new QcowError('QCOW_UNSUPPORTED', 'the refcount table lies outside the image; rebuilding the refcount structure is not supported');
  }
  const outside = rc.blockOffsets().findIndex((off) => off !== 0 && off + w.cs > w.fileSize);
  if (outside >= 0) {
    throw new QcowError('QCOW_UNSUPPORTED', `refcount block ${outside} lies outside the image; rebuilding the refcount structure is not supported`);
  }
  const out = { leaks: 0, corruptions: 0, messages: [] as string[] };
  // New refcount blocks must not land on clusters something references.
  rc.hooks.inUse = (c) => w.refs.get(c) > 0;
  const limit = Math.max(Math.ceil(w.fileSize / w.cs), w.refs.highest + 1);
  // Raise first (so no referenced cluster is ever counted free), then lower.
  for (const phase of ['raise', 'lower'] as const) {
    if (phase === 'raise' && mode !== 'all') continue;
    for (let c = 0; c < limit; c++) {
      const found = w.refs.get(c);
      const b = Math.floor(c / rc.perBlock);
      if ((rc.blockOffsets()[b] ?? 0) === 0 && found === 0) continue;
      const stored = await rc.get(c);
      if (phase === 'raise' && stored < found) {
        out.messages.push(`Repairing cluster ${c} refcount=${stored} reference=${found}`);
        await rc.set(c, found);
        out.corruptions++;
      } else if (phase === 'lower' && stored > found) {
        out.messages.push(`Repairing cluster ${c} refcount=${stored} reference=${found}`);
        await rc.set(c, found);
        out.leaks++;
      }
    }
    await rc.writeBack(() => store.flush());
    await store.flush();
  }
  if (rc.tableOffset !== w.h.refcountTableOffset) {
    w.h.refcountTableOffset = rc.tableOffset;
    w.h.refcountTableClusters = rc.tableClusters;
    await store.write(0, encodeHeader(w.h, w.cs));
  }
  if (mode === 'all') {
    // The counts are right now: recompute which COPIED flags are wrong and fix them.
    const again = await scan(store);
    const byTable = new Map<number, Array<{ at: number; entry: bigint; want: boolean }>>();
    for (const b of again.badCopied) {
      const list = byTable.get(b.table) ?? [];
      list.push(b);
      byTable.set(b.table, list);
    }
    for (const [table, list] of byTable) {
      for (const b of list) {
        const v = b.want ? b.entry | COPIED : b.entry & ~COPIED;
        const buf = new Uint8Array(8);
        new DataView(buf.buffer).setBigUint64(0, v);
        await store.write(table + b.at, buf);
        out.corruptions++;
        out.messages.push(`Repairing OFLAG_COPIED ${table === w.h.l1TableOffset ? 'L2 cluster' : 'data cluster'}: entry=${b.entry.toString(16)}`);
      }
    }
  }
  await store.flush();
  // What repair cannot fix (entries pointing outside the image...) shows up in the second scan.
  return out;
}

/** qemu-img check's JSON object, keys in its order, optional counts only when non-zero. */
export function checkJson(r: CheckResult, filename: string): Record<string, unknown> {
  const o: Record<string, unknown> = { 'image-end-offset': r.imageEndOffset };
  if (r.compressedClusters) o['compressed-clusters'] = r.compressedClusters;
  o['total-clusters'] = r.totalClusters;
  if (r.corruptions) o.corruptions = r.corruptions;
  if (r.corruptionsFixed) o['corruptions-fixed'] = r.corruptionsFixed;
  o['check-errors'] = r.checkErrors;
  if (r.leaks) o.leaks = r.leaks;
  if (r.leaksFixed) o['leaks-fixed'] = r.leaksFixed;
  if (r.allocatedClusters) o['allocated-clusters'] = r.allocatedClusters;
  o.filename = filename;
  o.format = 'qcow2';
  if (r.fragmentedClusters) o['fragmented-clusters'] = r.fragmentedClusters;
  return o;
}

/** qemu-img check's human summary (stdout). */
export function checkHuman(r: CheckResult): string {
  const lines: string[] = [];
  if (r.leaksFixed || r.corruptionsFixed) {
    lines.push('The following inconsistencies were found and repaired:', '');
    lines.push(`    ${r.leaksFixed} leaked clusters`, `    ${r.corruptionsFixed} corruptions`, '', 'Double checking the fixed image now...');
  }
  if (!r.corruptions && !r.leaks && !r.checkErrors) lines.push('No errors were found on the image.');
  if (r.corruptions) lines.push('', `${r.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  if (r.leaks) lines.push('', `${r.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  if (r.totalClusters && r.allocatedClusters) {
    const pct = (n: number, d: number) => ((n * 100) / d).toFixed(2);
    lines.push(
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters`,
    );
  }
  lines.push(`Image end offset: ${r.imageEndOffset}`);
  return lines.join('\n') + '\n';
}

/** qemu-img's exit status: 0 clean, 2 corruptions left, 3 only leaks left. */
export function checkExitCode(r: CheckResult): number {
  if (r.checkErrors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}
