/**
 * The links of a qcow (version 1) image that are set in memory but not yet on disk, and when and
 * how they go out. qcow v1 has no refcounts, so crash safety is only ordering: an L2 entry (or an
 * L1 entry naming a new L2 table) may reach the disk only after the bytes it points at. The device
 * writes new clusters and new tables first; the entries that point at them wait here, in index
 * ranges per table, and go out after one flush for many writes (sync), so a crash loses unflushed
 * writes and leaks space, never leaves an entry pointing at unwritten bytes.
 */
import { view } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';

/** Sync once this much data waits for its links... */
const MAX_UNSYNCED_BYTES = 32 << 20;
/** ...or this many L2 tables are held in memory ahead of their disk copies. */
const MAX_PINNED_TABLES = 64;

/** Where the pending L1 entries are written from. */
export interface L1Table {
  offset: number;
  bytes: Uint8Array;
}

export class PendingLinks {
  /** Changed index range of each L2 table (by offset). */
  private readonly l2 = new Map<number, { lo: number; hi: number }>();
  private l1 = { lo: Infinity, hi: -1 };
  private unsyncedBytes = 0;

  /** `bytes` more of data were written whose links wait here. */
  wrote(bytes: number): void {
    this.unsyncedBytes += bytes;
  }

  /** Entry `index` of the L2 table at `tableOffset` changed in memory. */
  l2Changed(tableOffset: number, index: number): void {
    const range = this.l2.get(tableOffset);
    if (range) {
      range.lo = Math.min(range.lo, index);
      range.hi = Math.max(range.hi, index);
    } else this.l2.set(tableOffset, { lo: index, hi: index });
  }

  /** L1 entry `index` changed in memory (it names a new L2 table). */
  l1Changed(index: number): void {
    this.l1.lo = Math.min(this.l1.lo, index);
    this.l1.hi = Math.max(this.l1.hi, index);
  }

  /** Time to sync: enough data waits for its links, or `pinnedTables` tables are held for them. */
  due(pinnedTables: number): boolean {
    return this.unsyncedBytes >= MAX_UNSYNCED_BYTES || pinnedTables >= MAX_PINNED_TABLES;
  }

  /**
   * Flush the data written so far, then write the changed ranges of the L2 tables (`table` gives
   * each one's in-memory entries) and of L1. False when nothing was pending (no flush either).
   */
  async sync(store: ByteStore, l1: L1Table, table: (offset: number) => Promise<BigUint64Array>): Promise<boolean> {
    this.unsyncedBytes = 0;
    if (this.l2.size === 0 && this.l1.hi < 0) return false;
    await store.flush();
    for (const [offset, { lo, hi }] of this.l2) {
      await store.write(offset + 8 * lo, encodeTable((await table(offset)).subarray(lo, hi + 1)));
    }
    const { lo, hi } = this.l1;
    if (hi >= 0) await store.write(l1.offset + 8 * lo, l1.bytes.subarray(8 * lo, 8 * (hi + 1)));
    this.l2.clear();
    this.l1 = { lo: Infinity, hi: -1 };
    return true;
  }
}

/** L2 entries as the big-endian bytes on disk. */
export function encodeTable(entries: BigUint64Array): Uint8Array {
  const out = new Uint8Array(8 * entries.length);
  const dv = view(out);
  for (let i = 0; i < entries.length; i++) dv.setBigUint64(8 * i, entries[i]!);
  return out;
}
