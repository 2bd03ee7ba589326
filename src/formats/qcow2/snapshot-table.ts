/**
 * The QCOW2 internal snapshot table: `nb_snapshots` variable-length entries at `snapshots_offset`,
 * each 8-byte aligned: fixed 40 bytes, extra data (qemu 7.2 writes 24 bytes: vm_state_size u64,
 * disk_size u64, icount u64), the id string, the name string, padding.
 *
 * API (the writer reuses it): `Qcow2Snapshot` (plain data), `readSnapshotTable(store, count,
 * offset, fileSize)`, `encodeSnapshotTable(snapshots)`, `findSnapshot(list, spec)` where spec is a name
 * or id, or qemu-img's `snapshot.name=N` / `snapshot.id=I` (comma-joined both must match).
 *
 * For check: `readStoredSnapshotTable` reads a table as qemu-img check reads it (every field kept
 * as stored, however wrong; zeros past the end of the file; qemu's limits, and with `repair`
 * qemu's way of cutting what exceeds them), and `encodeStoredSnapshotTable` writes such entries
 * back as qemu-img check -r all rewrites a damaged table.
 */
import { u16, u32, u64big, setU16, setU32, setU64, utf8, encodeUtf8, alignUp } from '../../core/bytes.js';
import { QcowError, corrupt } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import { MAX_L1_BYTES, MAX_SNAPSHOTS } from './layout.js';

export interface Qcow2Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** The 64-bit value from the extra data when present, else the 32-bit field. */
  vmStateSize: number;
  /**
   * Virtual size when the snapshot was taken (extra data). An entry without it (version 2 allows
   * that) reads as the image's virtual size at opening, as qemu reads it.
   */
  diskSize?: number;
  /** From the extra data; an entry without it reads as all ones ("no icount"), as in qemu. */
  icount?: bigint;
  /** Extra data beyond what we interpret, kept verbatim. */
  extraUnknown: Uint8Array;
  /**
   * Bytes of extra data the entry has on disk as read; undefined once it is (or is to be) written
   * as encodeSnapshotTable writes it. An upgrade to version 3 rewrites the table when an entry has
   * less than the 16 bytes version 3 requires.
   */
  storedExtraSize?: number;
}

/** The extra data version 3 requires of every entry: the 64-bit VM state size and the disk size. */
export const V3_MIN_EXTRA = 16;

const FIXED = 40;
/** qemu caps the whole table (QCOW_MAX_SNAPSHOTS_SIZE). */
export const MAX_TABLE_BYTES = 64 * 1024 * 1024;
const MAX_EXTRA = 1024;
/** qemu's words for its two limits (the compat front ends match on them). */
const TOO_MUCH_EXTRA = 'Too much extra metadata in snapshot table entry';
const TABLE_TOO_BIG = 'Snapshot table is too big';
/** icount all ones: the snapshot has none (qemu's -1). */
const NO_ICOUNT = 0xffffffffffffffffn;
/** A size in whole 512-byte sectors, as qemu keeps the virtual size (total_sectors). */
const sectorFloor = (n: number): number => Math.floor(n / 512) * 512;

/**
 * The table at `offset`. `virtualSize` (the image's, now) stands in for the disk size of an entry
 * that lacks it, as qemu fills it in when it reads the table.
 */
export async function readSnapshotTable(store: ByteStore, count: number, offset: number, fileSize: number, virtualSize: number): Promise<Qcow2Snapshot[]> {
  if (count === 0) return [];
  if (count > MAX_SNAPSHOTS) throw corrupt('Snapshot table too large');
  // Offset 0 is the header: no image means that, so opening refuses it (check reads such a table
  // anyway, with readStoredSnapshotTable below). A table past the end of the file is not refused:
  // QEMU reads it as zeros (entries with no name and no L1 table), and so do we.
  if (offset % 8 !== 0 || offset === 0) throw corrupt(`snapshot table offset 0x${offset.toString(16)} is invalid`);
  // Read as qemu reads it when opening: zeros past the end of the file, its two limits refused.
  const stored = await readStoredSnapshotTable(store, count, offset, fileSize, { repair: false });
  return stored.snapshots.map((e) => {
    const snap: Qcow2Snapshot = {
      l1TableOffset: exactOffset(e.l1TableOffset, 'snapshot L1 table offset'),
      l1Size: e.l1Size,
      id: utf8(cString(e.id)),
      name: utf8(cString(e.name)),
      dateSec: e.dateSec,
      dateNsec: e.dateNsec,
      vmClockNsec: exactOffset(e.vmClockNsec, 'snapshot vm clock'),
      vmStateSize: exactOffset(e.vmStateSize, 'snapshot vm state size'),
      diskSize: e.diskSize === undefined ? sectorFloor(virtualSize) : exactOffset(e.diskSize, 'snapshot disk size'),
      icount: e.icount ?? NO_ICOUNT,
      extraUnknown: e.unknownExtra,
      storedExtraSize: e.extraDataSize,
    };
    return snap;
  });
}

/** A stored 64-bit value as a number, refused when it is not exact (past 2^53). */
function exactOffset(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} 0x${v.toString(16)} is too large`);
  return Number(v);
}

/** The table's bytes, entries padded to 8 bytes; extra data as qemu 7.2 writes it (24 bytes + unknown). */
export function encodeSnapshotTable(snaps: readonly Qcow2Snapshot[]): Uint8Array {
  const entries = snaps.map((s) =>
    encodeEntry({
      ...s,
      id: encodeUtf8(s.id),
      name: encodeUtf8(s.name),
      vmStateSize32: Math.min(s.vmStateSize, 0xffffffff),
      extraLen: KNOWN_EXTRA + s.extraUnknown.length,
      diskSize: s.diskSize ?? 0,
      icount: s.icount ?? NO_ICOUNT,
      unknownExtra: s.extraUnknown,
    }),
  );
  return joinEntries(entries, true);
}

/**
 * The bytes the table of `snaps` takes on disk as it was read (entries with the extra data they
 * had, the last unpadded: qemu's snapshots_size), so that freeing it frees what it held.
 */
export function storedSnapshotTableLength(snaps: readonly Qcow2Snapshot[]): number {
  let size = 0;
  for (const s of snaps) {
    const extra = s.storedExtraSize ?? KNOWN_EXTRA + s.extraUnknown.length;
    size = alignUp(size, 8) + FIXED + extra + encodeUtf8(s.id).length + encodeUtf8(s.name).length;
  }
  return size;
}


/** One entry's fields as they go to disk, every policy (defaults, the 32-bit VM state size) decided. */
interface EntryFields {
  l1TableOffset: number | bigint;
  l1Size: number;
  id: Uint8Array;
  name: Uint8Array;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number | bigint;
  vmStateSize32: number;
  /** Bytes of extra data: the 24 known, then `unknownExtra`, then zeros. */
  extraLen: number;
  vmStateSize: number | bigint;
  diskSize: number | bigint;
  icount: bigint;
  unknownExtra: Uint8Array;
}

/** One entry's bytes, unpadded: the fixed part, the extra data, the id and the name. */
function encodeEntry(e: EntryFields): Uint8Array {
  const b = new Uint8Array(FIXED + e.extraLen + e.id.length + e.name.length);
  setU64(b, 0, e.l1TableOffset);
  setU32(b, 8, e.l1Size);
  setU16(b, 12, e.id.length);
  setU16(b, 14, e.name.length);
  setU32(b, 16, e.dateSec);
  setU32(b, 20, e.dateNsec);
  setU64(b, 24, e.vmClockNsec);
  setU32(b, 32, e.vmStateSize32);
  setU32(b, 36, e.extraLen);
  setU64(b, FIXED, e.vmStateSize);
  setU64(b, FIXED + 8, e.diskSize);
  setU64(b, FIXED + 16, e.icount);
  b.set(e.unknownExtra, FIXED + KNOWN_EXTRA);
  b.set(e.id, FIXED + e.extraLen);
  b.set(e.name, FIXED + e.extraLen + e.id.length);
  return b;
}

/** Entries one after another, each starting on 8 bytes; `padLast` pads the last one too. */
function joinEntries(entries: readonly Uint8Array[], padLast: boolean): Uint8Array {
  let size = 0;
  for (const e of entries) size = alignUp(size, 8) + e.length;
  const out = new Uint8Array(padLast ? alignUp(size, 8) : size);
  let off = 0;
  for (const e of entries) {
    off = alignUp(off, 8);
    out.set(e, off);
    off += e.length;
  }
  return out;
}

/**
 * Whether a snapshot's L1 table may be read, before anything reads it (QEMU validates it the same
 * way when it loads, reverts to or deletes a snapshot): at most qemu's 32 MiB, cluster aligned.
 */
export function checkSnapshotL1(snap: Qcow2Snapshot, clusterSize: number): void {
  const what = `snapshot '${snap.name}' L1 table`;
  if (snap.l1Size * 8 > MAX_L1_BYTES) throw corrupt(`${what}: ${snap.l1Size} entries is more than qemu's limit of ${MAX_L1_BYTES / 8}`);
  if (snap.l1Size > 0 && snap.l1TableOffset % clusterSize !== 0) throw corrupt(`${what} 0x${snap.l1TableOffset.toString(16)} is not cluster aligned`);
}

/**
 * The snapshot `spec` names: `snapshot.name=N`, `snapshot.id=I` (both, comma-joined, must both
 * match), or a bare string matched against ids first, then names (as qemu-img -l does).
 */
export function findSnapshot(snaps: readonly Qcow2Snapshot[], spec: string): Qcow2Snapshot {
  let id: string | undefined;
  let name: string | undefined;
  if (spec.startsWith('snapshot.')) {
    for (const part of spec.split(',')) {
      const eq = part.indexOf('=');
      const key = part.slice(0, eq);
      const value = part.slice(eq + 1);
      if (eq < 0 || (key !== 'snapshot.name' && key !== 'snapshot.id')) throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid snapshot option '${part}'`);
      if (key === 'snapshot.name') name = value;
      else id = value;
    }
  }
  const found =
    id !== undefined || name !== undefined
      ? snaps.find((s) => (id === undefined || s.id === id) && (name === undefined || s.name === name))
      : (snaps.find((s) => s.id === spec) ?? snaps.find((s) => s.name === spec));
  if (!found) throw new QcowError('QCOW_NOT_FOUND', `Can't find snapshot '${name ?? id ?? spec}'`);
  return found;
}

/** The extra data qemu interprets (vm_state_size u64, disk_size u64, icount u64), and writes at least. */
const KNOWN_EXTRA = 24;
/**
 * Bytes read at a time from a table (entries are small, and mostly come in a row): the first read
 * takes FIRST_WINDOW, each later one twice the last, up to READ_WINDOW. Every image with a snapshot
 * reads its table when it opens (info, map, check...), and a typical table is one or a few entries
 * of ~100 bytes: a 256 KiB window from the start cost each of those commands ~35 page faults (the
 * zeroed array's pages) for nothing.
 */
const FIRST_WINDOW = 4096;
const READ_WINDOW = 256 * 1024;

/**
 * One snapshot table entry as check reads it: every field as stored, nothing refused, so a
 * corrupt value is reported (and kept by a repair) as qemu-img check reports and keeps it.
 */
export interface StoredSnapshot {
  /** Any 64-bit value: a corrupt entry may name an unaligned offset or one past 2^53. */
  l1TableOffset: bigint;
  l1Size: number;
  /** As stored; qemu treats both as C strings, so they end at a NUL byte. */
  id: Uint8Array;
  name: Uint8Array;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  /** The 32-bit field, or the 64-bit one of the extra data when the entry has it. */
  vmStateSize: bigint;
  /** From the extra data, when the entry has it. */
  diskSize?: bigint;
  icount?: bigint;
  /** The extra data size as kept: as stored, or the limit when a repair dropped the rest. */
  extraDataSize: number;
  /** Extra data past the part qemu interprets, kept verbatim. */
  unknownExtra: Uint8Array;
}

/** A snapshot table as check read it. */
export interface StoredSnapshotTable {
  snapshots: StoredSnapshot[];
  /** From the table's start to the end of the last entry kept (qemu's snapshots_size; no padding after it). */
  size: number;
  /** Entries dropped from the end by a repair: the table was too big. */
  overhanging: number;
  /** Entries whose extra data a repair cut to the limit. */
  extraDropped: number;
  /** What the repair did, one line each, in qemu-img's words. */
  messages: string[];
}

/** The bytes of [at, at + n) of a store, zeros past its end (as QEMU reads a file), a window at a time. */
class ZeroPaddedReader {
  private buf = new Uint8Array(0);
  private start = 0;
  private window = FIRST_WINDOW;
  constructor(
    private readonly store: ByteStore,
    private readonly fileSize: number,
  ) {}

  async bytes(at: number, n: number): Promise<Uint8Array> {
    if (at < this.start || at + n > this.start + this.buf.length) {
      // No more than the file holds from `at` on: past its end are only zeros, made when asked for.
      this.buf = new Uint8Array(Math.max(n, Math.min(this.window, this.fileSize - at)));
      this.window = Math.min(this.window * 2, READ_WINDOW);
      this.start = at;
      const inFile = Math.min(this.buf.length, this.fileSize - at);
      if (inFile > 0) await this.store.read(at, this.buf.subarray(0, inFile));
    }
    return this.buf.slice(at - this.start, at - this.start + n);
  }
}

/**
 * Read `count` entries at `offset` as qemu-img check reads them (qcow2_do_read_snapshots): past
 * the end of the file come zeros, any field value is accepted. qemu's two limits hold: an entry's
 * extra data of at most 1 KiB, and a table of at most 64 MiB. Beyond them the read fails, or with
 * `repair` the extra data is cut to the limit and the entries from the one that passes 64 MiB on
 * are dropped, each said in `messages` as qemu-img says it.
 */
export async function readStoredSnapshotTable(store: ByteStore, count: number, offset: number, fileSize: number, options: { repair: boolean }): Promise<StoredSnapshotTable> {
  const r = new ZeroPaddedReader(store, fileSize);
  const out: StoredSnapshotTable = { snapshots: [], size: 0, overhanging: 0, extraDropped: 0, messages: [] };
  let pos = offset;
  // The table's length as it will be written back (cut extra data counted at the limit).
  let tableLength = 0;
  for (let i = 0; i < count; i++) {
    const entryStart = pos;
    tableLength = alignUp(tableLength, 8);
    pos = alignUp(pos, 8);
    const h = await r.bytes(pos, FIXED);
    pos += FIXED;
    let extraSize = u32(h, 36);
    const idLen = u16(h, 12);
    const nameLen = u16(h, 14);
    let cut = false;
    if (extraSize > MAX_EXTRA) {
      if (!options.repair) throw corrupt(`${TOO_MUCH_EXTRA} ${i} (check -r all drops it)`);
      out.messages.push(`Discarding too much extra metadata in snapshot table entry ${i} (${extraSize} > ${MAX_EXTRA})`);
      out.extraDropped++;
      cut = true;
    }
    const known = await r.bytes(pos, Math.min(KNOWN_EXTRA, extraSize));
    pos += known.length;
    const snap: StoredSnapshot = {
      l1TableOffset: u64big(h, 0),
      l1Size: u32(h, 8),
      id: new Uint8Array(0),
      name: new Uint8Array(0),
      dateSec: u32(h, 16),
      dateNsec: u32(h, 20),
      vmClockNsec: u64big(h, 24),
      vmStateSize: extraSize >= 8 ? u64big(known, 0) : BigInt(u32(h, 32)),
      extraDataSize: extraSize,
      unknownExtra: new Uint8Array(0),
    };
    if (extraSize >= 16) snap.diskSize = u64big(known, 8);
    if (extraSize >= 24) snap.icount = u64big(known, 16);
    if (extraSize > KNOWN_EXTRA) {
      // The file position moves past all of it; only what is kept is read.
      const extraEnd = pos + extraSize - KNOWN_EXTRA;
      if (cut) extraSize = MAX_EXTRA;
      snap.extraDataSize = extraSize;
      snap.unknownExtra = await r.bytes(pos, extraSize - KNOWN_EXTRA);
      pos = extraEnd;
    }
    snap.id = await r.bytes(pos, idLen);
    pos += idLen;
    snap.name = await r.bytes(pos, nameLen);
    pos += nameLen;
    tableLength += FIXED + extraSize + idLen + nameLen;
    if (tableLength > MAX_TABLE_BYTES || pos - offset > 0x7fffffff) {
      if (!options.repair) throw corrupt(`${TABLE_TOO_BIG} (check -r all drops the ${count - i} overhanging snapshots)`);
      out.messages.push(`Discarding ${count - i} overhanging snapshots (snapshot table is too big)`);
      out.overhanging = count - i;
      pos = entryStart;
      break;
    }
    out.snapshots.push(snap);
  }
  out.size = pos - offset;
  return out;
}

/** A stored C string: the bytes before the first NUL. */
export const cString = (b: Uint8Array): Uint8Array => {
  const nul = b.indexOf(0);
  return nul < 0 ? b : b.subarray(0, nul);
};

/**
 * Stored entries written back as qemu-img check -r all writes a table it repairs: at least the 24
 * bytes of extra data it knows (a disk size it lacks is the image's virtual size in whole sectors,
 * an icount it lacks is all ones), unknown extra data verbatim, id and name up to any NUL byte,
 * entries aligned to 8 bytes, none after the last.
 */
export function encodeStoredSnapshotTable(snaps: readonly StoredSnapshot[], virtualSize: number): Uint8Array {
  const entries = snaps.map((s) =>
    encodeEntry({
      ...s,
      id: cString(s.id),
      name: cString(s.name),
      // A VM state too big for the old field leaves it 0 (older readers see a disk-only snapshot).
      vmStateSize32: s.vmStateSize <= 0xffffffffn ? Number(s.vmStateSize) : 0,
      extraLen: Math.max(KNOWN_EXTRA, s.extraDataSize),
      diskSize: s.diskSize ?? BigInt(sectorFloor(virtualSize)),
      icount: s.icount ?? NO_ICOUNT,
    }),
  );
  return joinEntries(entries, false);
}
