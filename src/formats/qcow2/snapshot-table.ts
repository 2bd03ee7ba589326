/**
 * The QCOW2 internal snapshot table: `nb_snapshots` variable-length entries at `snapshots_offset`,
 * each 8-byte aligned: fixed 40 bytes, extra data (qemu 7.2 writes 24 bytes: vm_state_size u64,
 * disk_size u64, icount u64), the id string, the name string, padding.
 *
 * API (the writer reuses it): `Qcow2Snapshot` (plain data), `readSnapshotTable(store, count,
 * offset, fileSize)`, `encodeSnapshotTable(snapshots)`, `findSnapshot(list, spec)` where spec is a name
 * or id, or qemu-img's `snapshot.name=N` / `snapshot.id=I` (comma-joined both must match).
 */
import { u16, u32, u64, u64big, setU16, setU32, setU64, utf8, encodeUtf8, alignUp } from '../../core/bytes.js';
import { QcowError, corrupt } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import { MAX_SNAPSHOTS } from './layout.js';

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
  /** Virtual size when the snapshot was taken (extra data); undefined in old images. */
  diskSize?: number;
  /** Present when the extra data holds it (qemu 7.2 writes 0). */
  icount?: bigint;
  /** Extra data beyond what we interpret, kept verbatim. */
  extraUnknown: Uint8Array;
}

const FIXED = 40;
/** qemu caps the whole table (QCOW_MAX_SNAPSHOTS_SIZE). */
const MAX_TABLE_BYTES = 64 * 1024 * 1024;
const MAX_EXTRA = 1024;

export async function readSnapshotTable(store: ByteStore, count: number, offset: number, fileSize: number, options: { zeroOffset?: boolean } = {}): Promise<Qcow2Snapshot[]> {
  if (count === 0) return [];
  if (count > MAX_SNAPSHOTS) throw corrupt(`snapshot table: ${count} snapshots is more than the limit of ${MAX_SNAPSHOTS}`);
  // Offset 0 is the header: no image means that, so opening refuses it. check reads it anyway, as
  // qemu-img check does, to report (and repair) what it finds there like qemu-img.
  if (offset % 8 !== 0 || (offset === 0 && !options.zeroOffset) || offset >= fileSize) throw corrupt(`snapshot table offset 0x${offset.toString(16)} is invalid or beyond the end of the file`);
  // Read the table in chunks; an entry's variable part may cross a chunk boundary.
  const limit = Math.min(fileSize, offset + MAX_TABLE_BYTES);
  let buf = new Uint8Array(0);
  let bufStart = offset;
  const ensure = async (at: number, n: number, what: string) => {
    if (at + n > limit) {
      // The last entry's padding may be missing at EOF; fields themselves must be there.
      throw corrupt(`snapshot table: ${what} at 0x${at.toString(16)} runs past the end of the file`);
    }
    if (at >= bufStart && at + n <= bufStart + buf.length) return;
    const len = Math.min(limit - at, Math.max(n, 64 * 1024));
    buf = new Uint8Array(len);
    bufStart = at;
    await store.read(at, buf);
  };
  const out: Qcow2Snapshot[] = [];
  let pos = offset;
  for (let i = 0; i < count; i++) {
    await ensure(pos, FIXED, `entry ${i}`);
    const e = buf.subarray(pos - bufStart);
    const idLen = u16(e, 12);
    const nameLen = u16(e, 14);
    const extraLen = u32(e, 36);
    if (extraLen > MAX_EXTRA) throw corrupt(`snapshot table: entry ${i} has ${extraLen} bytes of extra data`);
    const total = FIXED + extraLen + idLen + nameLen;
    await ensure(pos, total, `entry ${i}`);
    const b = buf.subarray(pos - bufStart, pos - bufStart + total);
    const snap: Qcow2Snapshot = {
      l1TableOffset: u64(b, 0, 'snapshot L1 table offset'),
      l1Size: u32(b, 8),
      dateSec: u32(b, 16),
      dateNsec: u32(b, 20),
      vmClockNsec: u64(b, 24, 'snapshot vm clock'),
      vmStateSize: u32(b, 32),
      id: utf8(b.subarray(FIXED + extraLen, FIXED + extraLen + idLen)),
      name: utf8(b.subarray(FIXED + extraLen + idLen, total)),
      extraUnknown: new Uint8Array(0),
    };
    if (extraLen >= 8) snap.vmStateSize = u64(b, FIXED, 'snapshot vm state size');
    if (extraLen >= 16) snap.diskSize = u64(b, FIXED + 8, 'snapshot disk size');
    if (extraLen >= 24) snap.icount = u64big(b, FIXED + 16);
    if (extraLen > 24) snap.extraUnknown = b.slice(FIXED + 24, FIXED + extraLen);
    out.push(snap);
    pos = alignUp(pos + total, 8);
  }
  return out;
}

/** The table's bytes, entries padded to 8 bytes; extra data as qemu 7.2 writes it (24 bytes + unknown). */
export function encodeSnapshotTable(snaps: readonly Qcow2Snapshot[]): Uint8Array {
  const parts = snaps.map((s) => {
    const id = encodeUtf8(s.id);
    const name = encodeUtf8(s.name);
    const extraLen = 24 + s.extraUnknown.length;
    const b = new Uint8Array(alignUp(FIXED + extraLen + id.length + name.length, 8));
    setU64(b, 0, s.l1TableOffset);
    setU32(b, 8, s.l1Size);
    setU16(b, 12, id.length);
    setU16(b, 14, name.length);
    setU32(b, 16, s.dateSec);
    setU32(b, 20, s.dateNsec);
    setU64(b, 24, s.vmClockNsec);
    setU32(b, 32, Math.min(s.vmStateSize, 0xffffffff));
    setU32(b, 36, extraLen);
    setU64(b, FIXED, s.vmStateSize);
    setU64(b, FIXED + 8, s.diskSize ?? 0);
    setU64(b, FIXED + 16, s.icount ?? 0n);
    b.set(s.extraUnknown, FIXED + 24);
    b.set(id, FIXED + extraLen);
    b.set(name, FIXED + extraLen + id.length);
    return b;
  });
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
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
