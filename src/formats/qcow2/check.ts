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
import { QcowError, altHex, corrupt, unsupported } from '../../core/errors.js';
import { firstNonZero, setU32, setU64 } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';
import type { CheckResult, RepairMode } from '../../core/check.js';
import { AUTOCLEAR_FEATURES_OFFSET, INCOMPATIBLE_FEATURES_OFFSET, type Qcow2Header } from './header.js';
import { readHeader as readImageHeader } from './read-header.js';
import { AUTOCLEAR_BITMAPS, AUTOCLEAR_KNOWN, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, hasFeature } from './features.js';
import { MAX_L1_ENTRIES, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS, qcow2Geometry } from './layout.js';
import { contiguousEntries } from './l2-entry.js';
import { MAX_TABLE_BYTES, cString, encodeStoredSnapshotTable, readStoredSnapshotTable, type StoredSnapshot } from './snapshot-table.js';
import { Refcounts } from './alloc.js';
import { ClusterRefs } from './cluster-refs.js';
import { decodeDirectory, malformedReason, type BitmapEntry } from './bitmaps/directory.js';
import { entriesPerBlock, getRefcount, maxRefcount, refcountText, setRefcount } from './refcount.js';

/**
 * A host offset: a number below 2^53, a bigint from there (table entries hold 56 bits; past 2^53 a
 * number is not exact, and two different corrupt offsets must not compare equal). Always
 * normalised, so `===` compares offsets of either kind.
 */
type Off = number | bigint;
const EXACT = 2 ** 53;
const TWO32 = 2 ** 32;
/**
 * The furthest byte QEMU's block layer reads (INT64_MAX rounded down to 1 GiB): a table past it
 * is not read as zeros but fails with an I/O error, which ends qemu-img's check.
 */
const BDRV_MAX_LENGTH = 2n ** 63n - 2n ** 30n;
/** Where the header keeps nb_snapshots (u32), followed by snapshots_offset (u64). */
const HEADER_NB_SNAPSHOTS = 60;

/** QEMU's limits on what it reads for a check (layout.ts): an L1 table of 32 MiB, a refcount table of 8 MiB. */
const MAX_REFTABLE_BYTES = MAX_REFCOUNT_TABLE_BYTES;
/** Clusters past the end of the file kept out of a rebuild's way, at most. */
const MAX_BEYOND = 1 << 20;
/** Refcount blocks kept in memory while checking. */
const BLOCK_CACHE = 64;

function offsetOf(hi: number, lo: number): Off {
  // hi: the bits above 32 (already masked by the caller), lo: the low word (masked), both unsigned.
  if (hi < 0x200000) return hi * TWO32 + lo;
  return (BigInt(hi) << 32n) | BigInt(lo);
}
function addOff(off: Off, n: number): Off {
  if (typeof off === 'number' && off + n < EXACT) return off + n;
  const v = BigInt(off) + BigInt(n);
  return v < BigInt(EXACT) ? Number(v) : v;
}
const misaligned = (off: Off, cs: number): boolean => (typeof off === 'number' ? off % cs !== 0 : off % BigInt(cs) !== 0n);
/** A 64-bit value as an Off: a number when exact. */
const exact = (v: bigint): Off => (v < BigInt(EXACT) ? Number(v) : v);
const clusterOf = (off: Off, cs: number): number => (typeof off === 'number' ? Math.floor(off / cs) : Number(off / BigInt(cs)));
const hex = (v: Off | number): string => v.toString(16);
const u32 = (b: Uint8Array, o: number): number => ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
const entryHex = (hi: number, lo: number): string => ((BigInt(hi) << 32n) | BigInt(lo)).toString(16);

/**
 * The index of the first entry of [from, end) with a bit set, or `end`, in a table of entries of
 * `eb` bytes (8, or 16 with extended L2).
 *
 * Tables are mostly zeros (an L2 table of a 64 MiB image with 3 MiB written: 8144 of its 8192
 * entries are; a refcount table's entries: all but one), and a check runs once, cold, in V8's
 * interpreter: each walk looking at every entry through its own per-entry code took ~20 ms of
 * CPU for the four 8192-entry tables of such an image with one snapshot. The zeros are skipped by
 * {@link firstNonZero}, one call into the host addon per run of zeros; a loop of our own here
 * was hot enough for V8 to compile it with TurboFan in every check (~80 page faults and ~3 ms of
 * the compiler's work, for a few microseconds saved). A table full of entries (compressed
 * clusters, short runs) asks for the next one each time: that entry is tested here first.
 */
function nextEntry(t: Uint8Array, from: number, end: number, eb: number): number {
  if (from >= end) return end;
  const o = from * eb;
  if ((t[o]! | t[o + 1]! | t[o + 2]! | t[o + 3]! | t[o + 4]! | t[o + 5]! | t[o + 6]! | t[o + 7]!) !== 0) return from;
  const i = firstNonZero(t, o + 8, end * eb);
  return i >= end * eb ? end : Math.floor(i / eb);
}

interface Pass {
  h: Qcow2Header;
  cs: number;
  clusterBits: number;
  /** Bytes per L2 entry (8, or 16 with extended L2) and entries per table. */
  eb: number;
  l2Entries: number;
  extl2: boolean;
  external: boolean;
  fileSize: number;
  rbits: number;
  rmax: number;
  perBlock: number;
  /** The refcount table as stored (raw entries: reserved bits matter). */
  reftable: Uint8Array;
  reftableEntries: number;
  refs: ClusterRefs;
  /** Clusters compared: the file's, and any referenced just past its end. */
  nb: number;
  res: CheckResult;
  /** The refcount structure is broken beyond fixing counts in place. */
  rebuild: boolean;
  /** Something that holds references could not be walked: rebuilding would free what it uses. */
  incomplete: string | null;
  fix: RepairMode | null;
  blocks: Map<number, Uint8Array>;
  /**
   * Clusters just past the end of the file that tables point to but that were not counted (the
   * region reached a cluster or more past the end). A rebuild must not put its blocks there: the
   * file would grow over them, and a guest would read refcounts as its data.
   */
  beyond: Set<number>;
  /** How far past the end of the file `beyond` looks: what a rebuild could append. */
  beyondLimit: number;
  /** The snapshot table as the check read it (after any entries a repair dropped). */
  snap: SnapshotCheck;
  /** The snapshot table's own clusters were counted (it lies inside the file). */
  snapCounted: boolean;
  /**
   * One bit per cluster of the file: used as guest data by a table walked so far (the active
   * image's are walked first). A repair never writes into such a cluster as if it were a table.
   */
  dataClusters: Uint8Array;
  /**
   * The one buffer every L2 table is read into, one table at a time (the walks and the COPIED
   * check): a fresh 64 KiB buffer per walk cost 16 first-touched pages, ~0.25 ms, each time.
   */
  l2: Uint8Array;
  /**
   * The long runs of entries continuing each other in the file that the walk found in each L2
   * table of the active image, by the table's offset: [start, end, start, end, ...]. The COPIED
   * check reads the same tables again and takes these instead of comparing every entry with the
   * one before once more. Kept only by a walk that writes nothing (the tables stay as it read them).
   */
  runs: Map<number, number[]>;
  /**
   * A corruption event was reported by this check (a refcount lookup met a refcount block at an
   * unaligned offset, which QEMU's lookup signals; see signalBadBlock).
   */
  signalled?: 'non-fatal';
}

/** The shortest run worth keeping in {@link Pass.runs} (a fragmented table keeps nothing). */
const MIN_KEPT_RUN = 64;

/**
 * What reading the snapshot table found (qemu's qcow2_check_read_snapshot_table): the entries,
 * the table's place and size, and its own counts, added to the refcount pass's result at the end.
 */
interface SnapshotCheck {
  snapshots: StoredSnapshot[];
  offset: number;
  size: number;
  corruptions: number;
  corruptionsFixed: number;
  messages: string[];
}

/** Check (and optionally repair) the image in `store`. Throws only when the header is unreadable. */
export async function checkQcow2(store: ByteStore, options: { repair?: RepairMode } = {}): Promise<CheckResult> {
  const fix = options.repair ?? null;
  if (fix && store.readOnly) throw new QcowError('QCOW_READ_ONLY', 'cannot repair an image opened read-only');
  // Opening an image read-write, as a repair does, clears the autoclear bits QEMU does not know.
  if (fix) await clearUnknownAutoclear(store);
  // Broken bitmaps go first: their clusters then show as leaks, which the pass below repairs.
  const dropped = fix === 'all' ? await dropBroken(store) : [];
  const first = await checkPass(store, fix);
  first.messages = [...dropped, ...first.messages];
  first.corruptionsFixed += dropped.length;
  if (!fix || first.failed !== undefined || (first.corruptionsFixed === 0 && first.leaksFixed === 0)) return first;
  // As qemu-img: when something was repaired, the image is checked again and that result is
  // reported, with the counts of what was fixed.
  const again = await checkPass(store, null);
  again.corruptionsFixed = first.corruptionsFixed;
  again.leaksFixed = first.leaksFixed;
  again.messages = [...first.messages, ...again.messages];
  return again;
}

async function clearUnknownAutoclear(store: ByteStore): Promise<void> {
  const { h } = await readHeader(store);
  if (h.version < 3 || (h.autoclearFeatures & ~AUTOCLEAR_KNOWN) === 0n) return;
  const b = new Uint8Array(8);
  setU64(b, 0, h.autoclearFeatures & AUTOCLEAR_KNOWN);
  await store.write(AUTOCLEAR_FEATURES_OFFSET, b);
  await store.flush();
}

async function dropBroken(store: ByteStore): Promise<string[]> {
  const { h, fileSize } = await readHeader(store);
  const { dropBrokenBitmaps } = await import('./bitmaps/repair.js');
  return dropBrokenBitmaps(store, h, fileSize);
}

async function readHeader(store: ByteStore): Promise<{ h: Qcow2Header; fileSize: number }> {
  // Refuse what opening refuses, as qemu-img check does: a check cannot judge an image whose
  // features it does not understand.
  const { header: h, fileSize } = await readImageHeader(store);
  // What qemu-img refuses to open, it refuses to check: the tables' places and sizes.
  const cs = 2 ** h.clusterBits;
  if (h.refcountTableClusters > MAX_REFTABLE_BYTES / cs) throw corrupt('Reference count table too large');
  if (h.refcountTableOffset % cs !== 0) throw corrupt('Reference count table offset invalid');
  if (h.l1Size > MAX_L1_ENTRIES) throw corrupt('Active L1 table too large');
  if (h.l1TableOffset % cs !== 0) throw corrupt('Active L1 table offset invalid');
  const g = qcow2Geometry(h.clusterBits, hasFeature(h.incompatibleFeatures, INCOMPAT_EXTL2));
  // As opening refuses it (qcow2.ts): more L1 entries than qemu's int index counts.
  if (Math.ceil(h.size / (g.l2Entries * cs)) > 0x7fffffff) throw unsupported(`size 0x${BigInt(h.size).toString(16)} is too large for qemu's L1 index`);
  if (h.l1Size < Math.ceil(h.size / (g.l2Entries * cs))) throw corrupt('L1 table is too small');
  return { h, fileSize };
}

/** Bytes at `off` (zeros past the end of the file, as QEMU reads them). */
async function readAt(store: ByteStore, p: { fileSize: number }, off: Off, into: Uint8Array): Promise<void> {
  if (typeof off === 'bigint' || off >= p.fileSize) {
    into.fill(0);
    return;
  }
  await store.read(off, into);
}

/** `head`: the header as just read, when nothing has been written since (else it is read again). */
async function openPass(store: ByteStore, fix: RepairMode | null, snap: SnapshotCheck, head?: { h: Qcow2Header; fileSize: number }): Promise<Pass> {
  const { h, fileSize } = head ?? (await readHeader(store));
  const g = qcow2Geometry(h.clusterBits, hasFeature(h.incompatibleFeatures, INCOMPAT_EXTL2));
  const cs = g.clusterSize;
  const rbits = 2 ** h.refcountOrder;
  const tableBytes = h.refcountTableClusters * cs;
  if (tableBytes > MAX_REFTABLE_BYTES) throw corrupt(`refcount table of ${h.refcountTableClusters} clusters is too large`);
  const reftable = new Uint8Array(tableBytes);
  await readAt(store, { fileSize }, h.refcountTableOffset, reftable);
  const fileClusters = Math.ceil(fileSize / cs);
  return {
    h,
    cs,
    clusterBits: h.clusterBits,
    eb: g.l2EntryBytes,
    l2Entries: g.l2Entries,
    extl2: g.extendedL2,
    external: hasFeature(h.incompatibleFeatures, INCOMPAT_DATA_FILE),
    fileSize,
    rbits,
    rmax: maxRefcount(rbits),
    perBlock: entriesPerBlock(cs, rbits),
    reftable,
    reftableEntries: tableBytes / 8,
    refs: new ClusterRefs(fileClusters),
    nb: fileClusters,
    res: {
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      corruptionsFixed: 0,
      leaksFixed: 0,
      imageEndOffset: 0,
      // Of the virtual size in whole sectors, as qemu counts it.
      totalClusters: Math.ceil((Math.floor(h.size / 512) * 512) / cs),
      allocatedClusters: 0,
      fragmentedClusters: 0,
      compressedClusters: 0,
      messages: [],
    },
    rebuild: false,
    incomplete: null,
    fix,
    blocks: new Map(),
    beyond: new Set(),
    // Far enough that what a rebuild appends (blocks and a table for the file and for these
    // clusters themselves) never reaches past it.
    beyondLimit: 2 * fileClusters + MAX_BEYOND + 64,
    snap,
    snapCounted: false,
    dataClusters: new Uint8Array(Math.ceil(fileClusters / 8)),
    l2: new Uint8Array(cs),
    runs: new Map(),
  };
}

/** Data clusters [off, +n clusters) of a table walked (inside the file): guest data, never metadata. */
function markData(p: Pass, off: number, n: number): void {
  const first = Math.floor(off / p.cs);
  const end = Math.min(first + n, p.dataClusters.length * 8);
  const bits = p.dataClusters;
  let c = first;
  for (; c < end && (c & 7) !== 0; c++) bits[c >> 3]! |= 1 << (c & 7);
  // Whole bytes of a run at once (runs are as long as an L2 table's entries that follow each other).
  if (end - c >= 8) {
    bits.fill(0xff, c >> 3, end >> 3);
    c = end - (end % 8);
  }
  for (; c < end; c++) bits[c >> 3]! |= 1 << (c & 7);
}
const isData = (p: Pass, off: number): boolean => {
  const c = Math.floor(off / p.cs);
  return c < p.dataClusters.length * 8 && (p.dataClusters[c >> 3]! & (1 << (c & 7))) !== 0;
};

function error(p: Pass, m: string): void {
  p.res.corruptions++;
  p.res.messages.push(m);
}

/**
 * One more reference to every cluster of [offset, +length). As qemu-img check, a region reaching
 * a whole cluster or more past the end of the file is a corruption and is not counted (so the
 * counts stay bounded by the file, whatever a corrupt table says), and a count that would pass the
 * refcount width's maximum is a corruption too.
 */
function ref(p: Pass, offset: Off, length: number): void {
  if (length <= 0) return;
  if (typeof offset === 'bigint' || offset + length - p.fileSize >= p.cs) {
    error(p, `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(offset)} size 0x${length.toString(16)}`);
    if (typeof offset === 'number' && offset < p.beyondLimit * p.cs) {
      const fileClusters = Math.ceil(p.fileSize / p.cs);
      const last = Math.min(p.beyondLimit - 1, Math.floor((offset + length - 1) / p.cs));
      for (let c = Math.max(fileClusters, Math.floor(offset / p.cs)); c <= last && p.beyond.size < MAX_BEYOND; c++) p.beyond.add(c);
      if (p.beyond.size >= MAX_BEYOND) p.incomplete = 'too many clusters are referenced past the end of the file';
    }
    return;
  }
  const first = Math.floor(offset / p.cs);
  const last = Math.floor((offset + length - 1) / p.cs);
  if (p.refs.peak < p.rmax) {
    // No count can pass the width's maximum (none has reached it): the run is bumped in one step.
    p.refs.addRange(first, last);
    if (last + 1 > p.nb) p.nb = last + 1;
    return;
  }
  for (let c = first; c <= last; c++) {
    if (p.refs.get(c) >= p.rmax) {
      error(p, `ERROR: overflow cluster offset=0x${(c * p.cs).toString(16)}`);
      // QEMU's hint follows the error line (its words: they name qemu-img's commands).
      p.res.messages.push('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
      continue;
    }
    p.refs.addRange(c, c);
  }
  if (last + 1 > p.nb) p.nb = last + 1;
}

/**
 * The snapshot table, read first as qemu-img check reads it (qcow2_check_read_snapshot_table). A
 * table it cannot read at all (too many entries, an offset not aligned to a cluster or past what
 * a file can hold, an entry with too much extra data, a table over 64 MiB) ends the check with an
 * error. With `-r all` the entries over qemu's limits are dropped (the header's count is updated
 * at once, as qemu does: the refcount pass that follows reads it) and extra data over the limit
 * is cut; those and the v3 entries without their 16 bytes of extra data are corruptions that
 * {@link rewriteSnapshotTable} repairs once the refcounts are right.
 */
async function checkSnapshotTable(store: ByteStore, h: Qcow2Header, fileSize: number, fix: RepairMode | null): Promise<SnapshotCheck> {
  const repair = fix === 'all';
  const cs = 2 ** h.clusterBits;
  const messages: string[] = [];
  let count = h.nbSnapshots;
  let reduced = 0;
  if (count > MAX_SNAPSHOTS && repair) {
    messages.push(`Discarding ${count - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced = count - MAX_SNAPSHOTS;
    count = MAX_SNAPSHOTS;
  }
  if (count > MAX_SNAPSHOTS) throw corrupt(`ERROR snapshot table too large (${count} entries; check -r all drops the ${count - MAX_SNAPSHOTS} overhanging snapshots)`);
  // qemu takes offsets as signed 64-bit: the whole table must lie below 2^63.
  if (h.snapshotsOffset % cs !== 0 || BigInt(h.snapshotsOffset) > 2n ** 63n - 1n - BigInt(count * 40)) throw corrupt('ERROR snapshot table offset invalid');
  let table;
  try {
    table = await readStoredSnapshotTable(store, count, h.snapshotsOffset, fileSize, { repair });
  } catch (e) {
    if (!(e instanceof QcowError)) throw e;
    throw corrupt(`ERROR failed to read the snapshot table: ${e.message}`);
  }
  messages.push(...table.messages);
  reduced += table.overhanging;
  const snap: SnapshotCheck = { snapshots: table.snapshots, offset: h.snapshotsOffset, size: table.size, corruptions: table.extraDropped, corruptionsFixed: 0, messages };
  if (reduced > 0) {
    // The entries dropped from the end leak their clusters until the refcount pass frees them.
    const b = new Uint8Array(4);
    setU32(b, 0, table.snapshots.length);
    await store.write(HEADER_NB_SNAPSHOTS, b);
    await store.flush();
    snap.corruptionsFixed += reduced;
  }
  // Version 3 entries carry at least the 16 bytes of extra data that hold the sizes.
  if (h.version >= 3) {
    table.snapshots.forEach((s, i) => {
      if (s.extraDataSize >= 16) return;
      snap.corruptions++;
      messages.push(`${repair ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
    });
  }
  return snap;
}

const text = (b: Uint8Array): string => new TextDecoder().decode(cString(b));

/** Count every reference of the image (qemu's calculate_refcounts), checking tables on the way. */
async function calculate(store: ByteStore, p: Pass): Promise<void> {
  ref(p, 0, p.cs);
  await walkL1(store, p, p.h.l1TableOffset, p.h.l1Size, true);
  const { snapshots } = p.snap;
  if (p.external && snapshots.length > 0) error(p, `ERROR ${snapshots.length} snapshots in image with data file`);
  for (const s of snapshots) {
    const l1Offset = exact(s.l1TableOffset);
    if (misaligned(l1Offset, p.cs)) {
      error(p, `ERROR snapshot ${text(s.id)} (${text(s.name)}) l1_offset=0x${hex(l1Offset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      continue;
    }
    if (s.l1Size > MAX_L1_ENTRIES) {
      error(p, `ERROR snapshot ${text(s.id)} (${text(s.name)}) l1_size=0x${s.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`);
      continue;
    }
    await walkL1(store, p, l1Offset, s.l1Size, false);
  }
  const before = p.res.corruptions;
  ref(p, p.snap.offset, p.snap.size);
  p.snapCounted = p.snap.size > 0 && p.res.corruptions === before;
  ref(p, p.h.refcountTableOffset, p.reftableEntries * 8);
  if (p.h.fde) ref(p, p.h.fde.offset, p.h.fde.length);
  // QEMU ignores the bitmaps when the autoclear bit says a program without them wrote the image.
  if (p.h.bitmaps && p.h.bitmaps.nbBitmaps > 0 && hasFeature(p.h.autoclearFeatures, AUTOCLEAR_BITMAPS)) await walkBitmaps(store, p);
  checkRefblocks(p);
}

async function walkL1(store: ByteStore, p: Pass, l1Offset: Off, l1Size: number, active: boolean): Promise<void> {
  if (l1Size === 0) return;
  // An active L1 table that runs a cluster or more past the end of the file (a corrupt size) reads
  // whatever follows it as L2 pointers: its "tables" may be guest data, so nothing is written on
  // their word (no COPIED repair, no rebuild from the counts they give).
  if (active && typeof l1Offset === 'number' && l1Offset + l1Size * 8 - p.fileSize >= p.cs) p.incomplete = 'the active L1 table runs past the end of the file';
  ref(p, l1Offset, l1Size * 8);
  // A snapshot's L1 table named past what QEMU's block layer addresses cannot be read there: the
  // check ends, as qemu-img's does (an offset past 2^63 is negative to it, and fails the same way).
  if (typeof l1Offset === 'bigint' && l1Offset + BigInt(l1Size * 8) > BDRV_MAX_LENGTH) {
    throw new QcowError('QCOW_IO', `ERROR: I/O error in check_refcounts_l1 (a snapshot L1 table of ${l1Size * 8} bytes at 0x${hex(l1Offset)} lies past what a file can hold)`);
  }
  const l1 = new Uint8Array(l1Size * 8);
  await readAt(store, p, l1Offset, l1);
  for (let i = nextEntry(l1, 0, l1Size, 8); i < l1Size; i = nextEntry(l1, i + 1, l1Size, 8)) {
    const hi = u32(l1, i * 8);
    const lo = u32(l1, i * 8 + 4);
    if (hi & 0x7f000000 || lo & 0x1ff) error(p, `ERROR found L1 entry with reserved bits set: ${entryHex(hi, lo)}`);
    const l2Offset = offsetOf(hi & 0x00ffffff, (lo & 0xfffffe00) >>> 0);
    ref(p, l2Offset, p.cs);
    if (misaligned(l2Offset, p.cs)) error(p, `ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
    await walkL2(store, p, l2Offset, p.l2, active);
  }
}

async function walkL2(store: ByteStore, p: Pass, l2Offset: Off, t: Uint8Array, active: boolean): Promise<void> {
  await readAt(store, p, l2Offset, t);
  const { cs, eb, extl2, external } = p;
  const res = p.res;
  let next: Off = 0;
  const entries = p.l2Entries;
  // All-zero entries (unallocated, most of a sparse table) reference nothing: only the others are
  // looked at.
  for (let j = nextEntry(t, 0, entries, eb); j < entries; j = nextEntry(t, j + 1, entries, eb)) {
    const o = j * eb;
    const hi = u32(t, o);
    const lo = u32(t, o + 4);
    const zb = extl2 ? u32(t, o + 8) : 0;
    const ab = extl2 ? u32(t, o + 12) : 0;
    if (hi & 0x40000000) {
      // Named by its offset field (the entry without flags and sector count), as qemu names it.
      if (hi & 0x80000000) error(p, `ERROR: coffset=0x${hex(compressedRange(hi, lo, p.clusterBits).offset)}: copied flag must never be set for compressed clusters`);
      if (external) {
        error(p, `ERROR compressed cluster ${j} with data file, entry=0x${entryHex(hi, lo)}`);
        continue;
      }
      if (zb || ab) {
        error(p, `ERROR compressed cluster ${j} with non-zero subcluster allocation bitmap, entry=0x${entryHex(hi, lo)}`);
        continue;
      }
      const { offset, size } = compressedRange(hi, lo, p.clusterBits);
      ref(p, offset, size);
      if (active) {
        res.allocatedClusters++;
        res.compressedClusters++;
        // Compressed clusters count as fragmented, as qemu-img counts them.
        res.fragmentedClusters++;
      }
      continue;
    }
    if (hi & 0x3f000000 || lo & 0x1fe) error(p, `ERROR found l2 entry with reserved bits set: ${entryHex(hi, lo)}`);
    const off = offsetOf(hi & 0x00ffffff, (lo & 0xfffffe00) >>> 0);
    // The common case, a normal entry inside the file, with the entries after it that continue it
    // in the file, taken in one step: each counts as allocated, not fragmented, one reference each.
    if (!extl2 && !external && typeof off === 'number' && off !== 0 && (hi & 0x3f000000) === 0 && (lo & 0x1ff) === 0 && off % cs === 0 && off + cs <= p.fileSize) {
      const inFile = Math.floor((p.fileSize - off) / cs);
      const n = contiguousEntries(t, j, Math.min(p.l2Entries - j, inFile), cs) - j;
      if (active) {
        res.allocatedClusters += n;
        if (next !== 0 && off !== next) res.fragmentedClusters++;
        next = off + n * cs;
        if (n >= MIN_KEPT_RUN && p.fix === null && typeof l2Offset === 'number') {
          const runs = p.runs.get(l2Offset);
          if (runs) runs.push(j, j + n);
          else p.runs.set(l2Offset, [j, j + n]);
        }
      }
      ref(p, off, n * cs);
      markData(p, off, n);
      j += n - 1;
      continue;
    }
    const zeroFlag = !extl2 && (lo & 1) !== 0;
    const normal = off !== 0 || (external && (hi & 0x80000000) !== 0 && !zeroFlag);
    if (!normal) {
      // Unallocated or a plain zero cluster.
      if (!zeroFlag && ab) error(p, 'ERROR: Unallocated cluster has non-zero subcluster allocation map');
      continue;
    }
    if (zb & ab) error(p, `ERROR offset=${hex(off)}: Allocated cluster has corrupted subcluster allocation bitmap`);
    if (misaligned(off, cs)) {
      res.corruptions++;
      const hasData = extl2 ? ab !== 0 : !zeroFlag;
      if (!hasData) {
        // Never into a "table" that holds guest data (a corrupt snapshot L1 entry may name one):
        // the write would change what the guest reads. qemu-img writes there; we leave it.
        const guestData = typeof l2Offset === 'number' && isData(p, l2Offset);
        res.messages.push(`${p.fix === 'all' && !guestData ? 'Repairing' : 'ERROR'} offset=${hex(off)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
        if (p.fix === 'all' && !p.incomplete && !guestData && typeof l2Offset === 'number' && l2Offset % cs === 0 && l2Offset + cs <= p.fileSize) {
          // Made a zero cluster with no host offset (the cluster reads zeros either way).
          const e = new Uint8Array(eb);
          if (extl2) {
            const zeros = (zb | ab) >>> 0;
            e[8] = zeros >>> 24;
            e[9] = (zeros >>> 16) & 0xff;
            e[10] = (zeros >>> 8) & 0xff;
            e[11] = zeros & 0xff;
          } else e[7] = 1;
          await store.write(l2Offset + o, e);
          await store.flush();
          res.corruptions--;
          res.corruptionsFixed++;
          continue;
        }
      } else res.messages.push(`ERROR offset=${hex(off)}: Data cluster is not properly aligned; L2 entry corrupted.`);
    }
    if (active) {
      res.allocatedClusters++;
      if (next !== 0 && off !== next) res.fragmentedClusters++;
      next = addOff(off, cs);
    }
    if (!external) {
      ref(p, off, cs);
      if (typeof off === 'number' && !misaligned(off, cs)) markData(p, off, 1);
    }
  }
}

/** A compressed cluster's host range (start and length in bytes), from its descriptor words. */
function compressedRange(hi: number, lo: number, clusterBits: number): { offset: Off; size: number } {
  // The offset takes the low (62 - (cluster_bits - 8)) bits, the sector count the bits above.
  const hiBits = 62 - (clusterBits - 8) - 32;
  const hiPart = hi & ((1 << hiBits) - 1);
  const sectors = ((hi >>> hiBits) & ((1 << (clusterBits - 8)) - 1)) + 1;
  const offset = offsetOf(hiPart, lo);
  return { offset, size: sectors * 512 - (lo & 511) };
}

/** Refcount blocks: each must be in the file, aligned, and counted exactly once (qemu's check_refblocks). */
function checkRefblocks(p: Pass): void {
  const n = p.reftableEntries;
  // Zero entries (no block) are skipped: they have no reserved bits set and name no block.
  for (let i = nextEntry(p.reftable, 0, n, 8); i < n; i = nextEntry(p.reftable, i + 1, n, 8)) {
    const hi = u32(p.reftable, i * 8);
    const lo = u32(p.reftable, i * 8 + 4);
    if (lo & 0x1ff) {
      error(p, `ERROR refcount table entry ${i} has reserved bits set`);
      p.rebuild = true;
      continue;
    }
    const off = offsetOf(hi, lo);
    if (off === 0) continue;
    if (misaligned(off, p.cs)) {
      error(p, `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      p.rebuild = true;
      continue;
    }
    const c = clusterOf(off, p.cs);
    if (c >= p.nb) {
      // qemu-img -r all grows the file to reach such a block; we rebuild the structure instead
      // (a corrupt entry may name any offset below 2^64: the file would grow that far).
      error(p, `${p.fix === 'all' ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
      if (p.fix === 'all') p.rebuild = true;
      continue;
    }
    ref(p, off, p.cs);
    const n = p.refs.get(c);
    if (n !== 1) {
      error(p, `ERROR refcount block ${i} refcount=${n}`);
      p.rebuild = true;
    }
  }
}

/** The stored refcount block for table index `b`: null when there is none (all counts 0), 'bad' when unreadable. */
async function storedBlock(store: ByteStore, p: Pass, b: number): Promise<Uint8Array | null | 'bad'> {
  if (b >= p.reftableEntries) return null;
  const hi = u32(p.reftable, b * 8);
  const lo = (u32(p.reftable, b * 8 + 4) & 0xfffffe00) >>> 0;
  const off = offsetOf(hi, lo);
  if (off === 0) return null;
  if (misaligned(off, p.cs)) return 'bad';
  let block = p.blocks.get(b);
  if (!block) {
    block = new Uint8Array(p.cs);
    await readAt(store, p, off, block);
    if (p.blocks.size >= BLOCK_CACHE) p.blocks.delete(p.blocks.keys().next().value as number);
    p.blocks.set(b, block);
  }
  return block;
}

function countIn(block: Uint8Array, i: number, bits: number): number {
  if (bits === 16) return (block[2 * i]! << 8) | block[2 * i + 1]!;
  // A 64-bit count past 2^53 comes back as the nearest double: never equal to a number of references.
  return getRefcount(block, i, bits);
}

/** A cluster's stored refcount, or null when it cannot be read. */
async function storedCount(store: ByteStore, p: Pass, c: number): Promise<number | null> {
  const block = await storedBlock(store, p, Math.floor(c / p.perBlock));
  if (block === 'bad') return null;
  return block ? countIn(block, c % p.perBlock, p.rbits) : 0;
}

/** A cluster's stored refcount in decimal, exact at every width (for messages), as storedCount reads it. */
async function storedCountText(store: ByteStore, p: Pass, c: number): Promise<string> {
  const block = await storedBlock(store, p, Math.floor(c / p.perBlock));
  return block === 'bad' ? '?' : block ? refcountText(block, c % p.perBlock, p.rbits) : '0';
}

/**
 * Stored counts against references for every cluster of [0, nb) (qemu's compare_refcounts).
 * With `fix`, mismatches that can be corrected in place are (raising counts before lowering any),
 * and counted as fixed. Returns the highest cluster in use by either count.
 */
async function compare(store: ByteStore, p: Pass, fix: RepairMode | null): Promise<number> {
  const { res, refs, perBlock, rbits } = p;
  let highest = 0;
  const changes: Array<{ b: number; i: number; value: number; raise: boolean }> = [];
  for (let b = 0; b * perBlock < p.nb; b++) {
    const first = b * perBlock;
    const end = Math.min(p.nb, first + perBlock);
    const block = await storedBlock(store, p, b);
    if (block === 'bad') {
      signalBadBlock(p, b);
      for (let c = first; c < end; c++) {
        res.checkErrors++;
        res.messages.push(`Can't get refcount for cluster ${c}: Input/output error`);
      }
      continue;
    }
    if (!block && !refs.anyIn(first, end)) continue;
    for (let c = first; c < end; c++) {
      if (block) {
        // The clusters whose counts agree are passed in one loop (a call and two lookups per
        // cluster were a fifth of a 16 GiB image's check), the rest looked at below.
        const d = refs.sameAsStored(block, rbits, first, c, end);
        if (d > c) {
          const top = refs.lastReferenced(c, d);
          if (top >= 0) highest = top;
          c = d;
        }
        if (c >= end) break;
      }
      const stored = block ? countIn(block, c - first, rbits) : 0;
      const found = refs.get(c);
      if (stored === 0 && found === 0) continue;
      highest = c;
      if (stored === found) continue;
      let fixed = false;
      if (stored === 0) p.rebuild = true;
      else if (stored > found && fix) fixed = true;
      else if (stored < found && fix === 'all') fixed = true;
      const storedText = block ? refcountText(block, c - first, rbits) : '0';
      res.messages.push(`${fixed ? 'Repairing' : stored < found ? 'ERROR' : 'Leaked'} cluster ${c} refcount=${storedText} reference=${found}`);
      if (fixed) {
        changes.push({ b, i: c - first, value: found, raise: stored < found });
        if (stored > found) res.leaksFixed++;
        else res.corruptionsFixed++;
      } else if (stored < found) res.corruptions++;
      else res.leaks++;
    }
  }
  if (changes.length > 0) {
    // Raise first (no referenced cluster is ever counted free, whatever a crash leaves), then lower.
    for (const raise of [true, false]) {
      const touched = new Set<number>();
      for (const ch of changes) {
        if (ch.raise !== raise) continue;
        const block = await storedBlock(store, p, ch.b);
        if (!block || block === 'bad') continue;
        setRefcount(block, ch.i, rbits, ch.value);
        touched.add(ch.b);
      }
      for (const b of touched) {
        const off = Number(offsetOf(u32(p.reftable, b * 8), (u32(p.reftable, b * 8 + 4) & 0xfffffe00) >>> 0));
        await store.write(off, p.blocks.get(b)!);
      }
      if (touched.size > 0) await store.flush();
    }
  }
  return highest;
}

/**
 * The first lookup of a count in the refcount block at an unaligned offset, table index `b`: a
 * corruption event, as QEMU's lookup signals it (the line QEMU prints among the check's). Only a
 * check that repairs nothing reports it. A repairing one rebuilds the refcounts instead (see
 * refcountPass): QEMU's, with the image open read-write, marks the image corrupt at this point,
 * gives up its driver and fails the repair part way, leaving the old structure's clusters leaked
 * and the corrupt bit for a second `check -r all`; ours repairs in one pass and leaves the image
 * clean (docs/compatibility.md).
 */
function signalBadBlock(p: Pass, b: number): void {
  if (p.signalled || p.fix) return;
  const off = offsetOf(u32(p.reftable, b * 8), (u32(p.reftable, b * 8 + 4) & 0xfffffe00) >>> 0);
  p.signalled = 'non-fatal';
  p.res.messages.push(`qcow2: Image is corrupt: Refblock offset 0x${off.toString(16)} unaligned (reftable index: ${altHex(b)}); further non-fatal corruption events will be suppressed`);
}

/**
 * A new refcount structure from the counts found (qemu's rebuild_refcount_structure, in our own
 * code): blocks and table go into clusters nothing references, first fit from the start of the
 * file, as qemu places them; the header is switched to the new table only once all of it is on
 * disk. Until then the old structure is untouched, so a crash leaves the image as it was.
 */
async function rebuildRefcounts(store: ByteStore, p: Pass): Promise<void> {
  if (p.incomplete) throw new QcowError('QCOW_CORRUPT', `${p.incomplete}; the refcount structure cannot be rebuilt safely`);
  const { cs, perBlock, rbits } = p;
  let nb = p.nb;
  const counts: number[] = new Array<number>(nb).fill(0);
  for (let c = 0; c < nb; c++) counts[c] = p.refs.get(c);
  const countAt = (c: number) => counts[c] ?? 0;
  // Clusters tables point to past the end of the file are never handed out (the guest would read
  // refcounts as its data); those the grown file comes to hold are counted as used.
  const free = (c: number) => countAt(c) === 0 && !p.beyond.has(c);
  /** First run of `n` free clusters at or after from.c (qemu's first fit), growing past the end when needed. */
  const alloc = (n: number, from: { c: number }): number => {
    let run = 0;
    let c = from.c;
    let firstGap = true;
    for (; run < n; c++) {
      if (free(c)) {
        run++;
        if (firstGap) {
          from.c = c;
          firstGap = false;
        }
      } else run = 0;
    }
    const start = c - run;
    for (let k = 0; k < n; k++) counts[start + k] = 1;
    if (start + n > nb) nb = start + n;
    return start;
  };
  // Plan first, in memory: blocks for every block range holding a count, a table for them; each
  // allocation may need another block or a bigger table, so repeat until nothing changes.
  const table: number[] = [];
  let tableEntries = 0;
  let tableCluster = -1;
  let tableClusters = 0;
  for (let changed = true; changed; ) {
    changed = false;
    for (const c of p.beyond) {
      if (c < nb && counts[c] === 0) {
        counts[c] = 1;
        changed = true;
      }
    }
    const from = { c: 0 };
    for (let bi = 0; bi * perBlock < nb; bi++) {
      if ((table[bi] ?? 0) !== 0) continue;
      let any = false;
      for (let c = bi * perBlock; c < Math.min(nb, (bi + 1) * perBlock) && !any; c++) any = countAt(c) !== 0;
      if (!any) continue;
      if (from.c < bi * perBlock) from.c = bi * perBlock;
      table[bi] = alloc(1, from) * cs;
      changed = true;
    }
    const need = Math.ceil((table.length * 8) / cs) * (cs / 8);
    if (need > tableEntries || tableCluster < 0) {
      tableEntries = Math.max(need, cs / 8);
      tableClusters = (tableEntries * 8) / cs;
      // A table outgrown is left behind (it is not named anywhere; the check after counts it free).
      tableCluster = alloc(tableClusters, { c: 0 });
      changed = true;
    }
  }
  for (let bi = 0; bi < table.length; bi++) {
    const off = table[bi] ?? 0;
    if (off === 0) continue;
    const block = new Uint8Array(cs);
    const start = bi * perBlock;
    for (let k = 0; k < perBlock; k++) {
      const v = countAt(start + k);
      if (v !== 0) setRefcount(block, k, rbits, Math.min(v, p.rmax));
    }
    await store.write(off, block);
  }
  const buf = new Uint8Array(tableEntries * 8);
  for (let i = 0; i < table.length; i++) setU64(buf, i * 8, table[i] ?? 0);
  await store.write(tableCluster * cs, buf);
  // Everything the new table names is on disk before the header names it.
  await store.flush();
  const hdr = new Uint8Array(12);
  setU64(hdr, 0, tableCluster * cs);
  setU32(hdr, 8, tableClusters);
  await store.write(48, hdr);
  await store.flush();
}

/**
 * COPIED must be set exactly where the stored refcount is 1, in the active L1 and its L2 tables
 * (qemu's check_oflag_copied). With `repair`, wrong flags are corrected.
 */
async function checkCopied(store: ByteStore, p: Pass, repair: boolean): Promise<void> {
  const { h, cs, eb, extl2, external, res } = p;
  if (h.l1Size === 0) return;
  const l1 = new Uint8Array(h.l1Size * 8);
  await readAt(store, p, h.l1TableOffset, l1);
  const t = p.l2;
  // All-zero entries name no table and no cluster: skipped without a look at their fields.
  for (let i = nextEntry(l1, 0, h.l1Size, 8); i < h.l1Size; i = nextEntry(l1, i + 1, h.l1Size, 8)) {
    const hi = u32(l1, i * 8);
    const lo = u32(l1, i * 8 + 4);
    const l2Offset = offsetOf(hi & 0x00ffffff, (lo & 0xfffffe00) >>> 0);
    if (l2Offset === 0) continue;
    const r = await storedCount(store, p, clusterOf(l2Offset, cs));
    if (r === null) continue;
    if ((r === 1) !== ((hi & 0x80000000) !== 0)) {
      res.corruptions++;
      res.messages.push(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${entryHex(hi, lo)} refcount=${await storedCountText(store, p, clusterOf(l2Offset, cs))}`);
      if (repair) {
        const e = l1.subarray(i * 8, i * 8 + 8);
        e[0] = r === 1 ? e[0]! | 0x80 : e[0]! & 0x7f;
        await store.write(h.l1TableOffset + i * 8, e.slice());
        await store.flush();
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    await readAt(store, p, l2Offset, t);
    let dirty = 0;
    // The runs the walk found in this table (the same bytes: nothing was written since).
    const runs = typeof l2Offset === 'number' ? p.runs.get(l2Offset) : undefined;
    let run = 0;
    for (let j = nextEntry(t, 0, p.l2Entries, eb); j < p.l2Entries; j = nextEntry(t, j + 1, p.l2Entries, eb)) {
      const o = j * eb;
      const ehi = u32(t, o);
      const elo = u32(t, o + 4);
      if ((ehi | elo) === 0) continue;
      if (ehi & 0x40000000) continue;
      const off = offsetOf(ehi & 0x00ffffff, (elo & 0xfffffe00) >>> 0);
      if (!extl2 && !external && typeof off === 'number' && off !== 0 && (elo & 0x1ff) === 0 && off % cs === 0 && off + cs <= p.fileSize) {
        // The common case: a run of plain entries that continue each other in the file, their
        // flags checked against the counts in one loop. A disagreeing entry is reported below.
        if (runs) while (run < runs.length && runs[run]! < j) run += 2;
        const end = runs && runs[run] === j ? runs[run + 1]! : contiguousEntries(t, j, Math.min(p.l2Entries - j, Math.floor((p.fileSize - off) / cs)), cs);
        const agreeTo = await copiedAgree(store, p, t, j, end, off / cs);
        if (agreeTo > j) {
          j = agreeTo - 1;
          continue;
        }
      }
      const zeroFlag = !extl2 && (elo & 1) !== 0;
      if (off === 0 && !(external && (ehi & 0x80000000) !== 0 && !zeroFlag)) continue;
      let rc: number | null;
      if (external) rc = 1;
      else rc = await storedCount(store, p, clusterOf(off, cs));
      if (rc === null) continue;
      if ((rc === 1) !== ((ehi & 0x80000000) !== 0)) {
        res.corruptions++;
        res.messages.push(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${entryHex(ehi, elo)} refcount=${external ? '1' : await storedCountText(store, p, clusterOf(off, cs))}`);
        if (repair) {
          t[o] = rc === 1 ? t[o]! | 0x80 : t[o]! & 0x7f;
          dirty++;
        }
      }
    }
    if (dirty > 0) {
      // Written back only where a table can be: aligned, inside the file.
      if (typeof l2Offset === 'number' && l2Offset % cs === 0 && l2Offset + cs <= p.fileSize) {
        await store.write(l2Offset, t);
        await store.flush();
        res.corruptions -= dirty;
        res.corruptionsFixed += dirty;
      } else {
        res.checkErrors++;
        res.messages.push(`ERROR: Could not write L2 table at 0x${hex(l2Offset)}`);
      }
    }
  }
}

/**
 * How far entries [j, end) of an L2 table (plain entries naming clusters c0, c0 + 1, ... of the
 * file) have COPIED exactly where the stored count is 1: the first that does not, or `end`.
 * One await per refcount block the run reaches, not one per entry: an await per entry (16384 for
 * a 1 GiB image) was most of a check's CPU, in promises and their garbage.
 */
async function copiedAgree(store: ByteStore, p: Pass, t: Uint8Array, j: number, end: number, c0: number): Promise<number> {
  const { perBlock, rbits, eb } = p;
  let c = c0;
  while (j < end) {
    const b = Math.floor(c / perBlock);
    const block = await storedBlock(store, p, b);
    // An unreadable block: the entry goes the slow way, which skips it as qemu does.
    if (block === 'bad') return j;
    const stop = Math.min(end, j + (b + 1) * perBlock - c);
    const k = copiedAgreeIn(t, j, stop, eb, block, c - b * perBlock, rbits);
    if (k < stop) return k;
    c += stop - j;
    j = stop;
  }
  return end;
}

/** {@link copiedAgree} inside one refcount block (null: none, every count 0), entry j's count at index i. */
function copiedAgreeIn(t: Uint8Array, j: number, end: number, eb: number, block: Uint8Array | null, i: number, bits: number): number {
  if (block !== null && bits === 16) return copiedAgree16(t, j, end, eb, block, i);
  for (; j < end; j++, i++) {
    const one = block !== null && countIn(block, i, bits) === 1;
    // COPIED is the top bit of the entry's first byte.
    if (one !== t[j * eb]! >= 0x80) return j;
  }
  return end;
}

/**
 * {@link copiedAgreeIn} for the default width, with no call per entry: in a cold process this
 * loop runs interpreted for much of a 1 GiB image's 16384 entries, where a call per entry to
 * read the count cost ~1 ms.
 */
function copiedAgree16(t: Uint8Array, j: number, end: number, eb: number, block: Uint8Array, i: number): number {
  for (let k = 2 * i; j < end; j++, k += 2) if ((block[k] === 0 && block[k + 1] === 1) !== t[j * eb]! >= 0x80) return j;
  return end;
}

/**
 * One check, as qemu's qcow2 driver runs it (qcow2_co_check_locked): the snapshot table read,
 * the refcounts checked (and repaired), then the snapshot table rewritten if it needs it.
 */
async function checkPass(store: ByteStore, fix: RepairMode | null): Promise<CheckResult> {
  const { h, fileSize } = await readHeader(store);
  const snap = await checkSnapshotTable(store, h, fileSize, fix);
  // Without a repair nothing has changed the header since: the pass takes it as read.
  const p = await refcountPass(store, fix, snap, fix === null ? { h, fileSize } : undefined);
  const res = p.res;
  if (snap.corruptions > 0 && fix === 'all') {
    if (p.rebuild || res.checkErrors > 0) {
      // Allocating needs counts that can be trusted: the table stays as it is, its faults counted.
      res.checkErrors++;
      res.messages.push('ERROR failed to update snapshot table: the refcount structure could not be repaired');
    } else {
      await rewriteSnapshotTable(store, p);
      snap.corruptionsFixed += snap.corruptions;
      snap.corruptions = 0;
    }
  }
  res.corruptions += snap.corruptions;
  res.corruptionsFixed += snap.corruptionsFixed;
  res.messages = [...snap.messages, ...res.messages];
  if (fix && res.checkErrors === 0 && res.corruptions === 0 && res.failed === undefined) await markClean(store, p.h);
  return res;
}

/**
 * The snapshot table written anew from the entries read (qemu's qcow2_write_snapshots), once the
 * refcounts are right: into free clusters (never one anything references, nor the old table's),
 * counted and flushed before the header names it; only then is the old table's count dropped.
 * A crash at any point leaves the old table or the new one named, and leaks at worst.
 */
async function rewriteSnapshotTable(store: ByteStore, p: Pass): Promise<void> {
  const { snap, cs } = p;
  const bytes = encodeStoredSnapshotTable(snap.snapshots, p.h.size);
  if (bytes.length > MAX_TABLE_BYTES) throw corrupt('ERROR failed to update snapshot table: File too large');
  // The header read again: a rebuild may have moved the refcount table.
  const { h } = await readHeader(store);
  const rc = await Refcounts.load(store, { clusterSize: cs, refcountBits: p.rbits, tableOffset: h.refcountTableOffset, tableClusters: h.refcountTableClusters });
  const oldFirst = Math.floor(snap.offset / cs);
  const oldLast = Math.floor((snap.offset + snap.size - 1) / cs);
  rc.hooks.inUse = (c) => p.refs.get(c) > 0 || p.beyond.has(c) || (snap.size > 0 && c >= oldFirst && c <= oldLast);
  const at = bytes.length > 0 ? await rc.allocClusters(Math.ceil(bytes.length / cs)) : 0;
  await rc.writeBack(() => store.flush());
  if (bytes.length > 0) await store.write(at, bytes);
  await store.flush();
  const pointer = new Uint8Array(12);
  setU32(pointer, 0, snap.snapshots.length);
  setU64(pointer, 4, at);
  await store.write(HEADER_NB_SNAPSHOTS, pointer);
  await store.flush();
  // The old table's clusters lose the reference it held, when the pass counted one (a table
  // reaching past the end of the file was not counted). All or nothing, as qemu frees a range.
  if (!p.snapCounted) return;
  try {
    await rc.update(snap.offset, snap.size, -1);
  } catch (e) {
    if (!(e instanceof QcowError)) throw e;
    return;
  }
  await rc.writeBack(() => store.flush());
  await store.flush();
}

/** The refcount part of a check (qemu's qcow2_check_refcounts): count, compare, repair, COPIED flags. */
async function refcountPass(store: ByteStore, fix: RepairMode | null, snap: SnapshotCheck, head?: { h: Qcow2Header; fileSize: number }): Promise<Pass> {
  let p = await openPass(store, fix, snap, head);
  await calculate(store, p);
  // Tables that may be guest data (an active L1 past the end of the file) are never written on
  // their word: the repair stops before writing anything.
  if (fix && p.incomplete?.startsWith('the active L1')) throw new QcowError('QCOW_CORRUPT', `${p.incomplete}; the image cannot be repaired safely`);
  const pre = { ...p.res, messages: [...p.res.messages] };
  let highest = await compare(store, p, null);
  if (p.rebuild && fix === 'all') {
    const old = { corruptions: p.res.corruptions, leaks: p.res.leaks, corruptionsFixed: p.res.corruptionsFixed, leaksFixed: p.res.leaksFixed };
    const messages = [...p.res.messages, 'Rebuilding refcount structure'];
    await rebuildRefcounts(store, p);
    // Counted again against the new structure; what the old one used shows as leaks, fixed here.
    p = await openPass(store, null, snap);
    await calculate(store, p);
    const saved = { ...p.res };
    p.res.corruptions = 0;
    p.res.leaks = 0;
    highest = await compare(store, p, 'leaks');
    const freshLeaks = p.res.leaks;
    if (p.rebuild) messages.push('ERROR rebuilt refcount structure is still broken');
    // p.res.messages holds the recount's lines, then the leak repair's (saved shares the array).
    p.res = { ...saved, messages: [...messages, ...p.res.messages] };
    p.res.corruptionsFixed = old.corruptionsFixed + Math.max(0, old.corruptions - p.res.corruptions);
    p.res.leaksFixed = old.leaksFixed + Math.max(0, old.leaks - p.res.leaks);
    p.res.leaks += freshLeaks;
    p.fix = fix;
  } else if (fix) {
    if (p.rebuild) {
      // Only -r all rebuilds: qemu's check stops here with EIO, having changed nothing.
      p.res.messages.push('ERROR need to rebuild refcount structures');
      p.res.checkErrors++;
      p.res.failed = 'Input/output error';
      return p;
    }
    if (p.res.leaks || p.res.corruptions) {
      // The counts start over for the repairing pass, but the lines the first pass found are
      // kept: qemu-img prints them before its "Repairing" lines (iotest 138).
      p.res = { ...pre, messages: p.res.messages };
      highest = await compare(store, p, fix);
    }
  }
  const repair = !p.incomplete && (fix === 'all' || (fix === 'leaks' && !p.res.checkErrors && !p.res.corruptions && !p.res.leaks));
  await checkCopied(store, p, repair);
  p.res.imageEndOffset = (highest + 1) * p.cs;
  return p;
}

/** After a successful repair: the dirty and corrupt bits are cleared, as qemu-img does. */
async function markClean(store: ByteStore, h: Qcow2Header): Promise<void> {
  if (h.version < 3) return;
  const bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
  if ((h.incompatibleFeatures & bits) === 0n) return;
  const b = new Uint8Array(8);
  setU64(b, 0, h.incompatibleFeatures & ~bits);
  await store.write(INCOMPATIBLE_FEATURES_OFFSET, b);
  await store.flush();
}

/**
 * Bitmap directory and each bitmap's table and data clusters, counted as QEMU counts them; a
 * directory that does not decode, a table outside the file and malformed table entries are
 * corruptions (`check -r all` removes such bitmaps first: bitmaps/repair.ts). Nothing read is
 * larger than the file.
 */
async function walkBitmaps(store: ByteStore, p: Pass): Promise<void> {
  const ext = p.h.bitmaps!;
  if (ext.directoryOffset + ext.directorySize > p.fileSize) {
    error(p, 'ERROR bitmap directory is outside the image');
    p.incomplete = 'the bitmap directory is unreadable';
    return;
  }
  ref(p, ext.directoryOffset, ext.directorySize);
  const dir = new Uint8Array(ext.directorySize);
  await store.read(ext.directoryOffset, dir);
  let entries: BitmapEntry[];
  try {
    entries = decodeDirectory(dir, ext.nbBitmaps);
  } catch (e) {
    error(p, `ERROR ${(e as Error).message}`);
    return;
  }
  for (const e of entries) {
    if (e.tableOffset === 0 || e.tableOffset % p.cs !== 0) {
      error(p, `ERROR bitmap '${e.name}': table at 0x${e.tableOffset.toString(16)} (${e.tableSize} entries) is invalid`);
      continue;
    }
    // An entry QEMU refuses (type, granularity, flags, sizes) keeps the image from opening there
    // and is what `-r all` removes, so it is a corruption here too. Its table is still walked:
    // its clusters are in use until the repair drops it.
    // (The file's length is left out of these rules: a table past the end is ref's to report.)
    const why = malformedReason(e, p.cs, Infinity);
    if (why) error(p, `ERROR bitmap '${e.name}' cannot be used: ${why}`);
    // A table reaching past the end of the file is counted as QEMU counts it (ref says when that is
    // a cluster or more), and its entries there read as zeros, naming nothing: only the part in
    // the file is read, so a hostile size costs no more memory than the file has.
    ref(p, e.tableOffset, e.tableSize * 8);
    const inFile = Math.max(0, Math.min(e.tableSize, Math.floor((p.fileSize - e.tableOffset) / 8)));
    const t = new Uint8Array(inFile * 8);
    await store.read(e.tableOffset, t);
    for (let k = 0; k < inFile; k++) {
      const hi = u32(t, k * 8);
      const lo = u32(t, k * 8 + 4);
      const off = offsetOf(hi & 0x00ffffff, (lo & 0xfffffe00) >>> 0);
      // Reserved: bits 56-63 and 1-8; bit 0 (all ones) only without an offset.
      if (hi & 0xff000000 || lo & 0x1fe || (off !== 0 && lo & 1) || misaligned(off, p.cs)) {
        error(p, `ERROR bitmap '${e.name}': table entry ${k} is invalid (0x${entryHex(hi, lo)})`);
        continue;
      }
      if (off !== 0) ref(p, off, p.cs);
    }
  }
}
