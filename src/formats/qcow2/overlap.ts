/**
 * Metadata overlap checks, as QEMU's qcow2 makes them (its `overlap-check` option, default
 * "cached"): a newly allocated host range must not hold the header, the active L1 table, an active
 * L2 table, the refcount table, a refcount block, the snapshot table, a snapshot's L1 table or the
 * bitmap directory. The allocator trusts the refcounts; on an image whose refcounts are corrupt
 * (counts of metadata clusters zeroed by hand) it would otherwise hand out a cluster that holds
 * metadata, and the write would overwrite it. QEMU then fails the write and marks the image
 * corrupt; so do we (the allocator throws a CorruptionEvent, the writer marks the image).
 *
 * Cheap by construction, as the check runs at every allocation: no I/O, and no scan of whole
 * tables per check. The L2 tables and refcount blocks are sets their owners keep up to date
 * (ClusterMap.isL2Table, Refcounts.isRefcountBlock); the few multi-cluster structures are a small
 * sorted list, rebuilt only when one of them moves (its key changes). Inactive L2 tables
 * (QEMU's "all" level) are not checked, as QEMU's default does not.
 */
import type { Qcow2Header } from './header.js';
import type { Qcow2Snapshot } from './snapshot-table.js';
import { storedSnapshotTableLength } from './snapshot-table.js';

/** QEMU's names of the structures, in its priority order (the first one overlapped is named). */
export const OVERLAP_NAMES = [
  'qcow2_header',
  'active L1 table',
  'active L2 table',
  'refcount table',
  'refcount block',
  'snapshot table',
  'inactive L1 table',
  'bitmap directory',
] as const;
export type OverlapName = (typeof OVERLAP_NAMES)[number];

const RANK: Record<OverlapName, number> = Object.fromEntries(OVERLAP_NAMES.map((n, i) => [n, i])) as Record<OverlapName, number>;

/** What the check reads: each piece from its one owner. */
export interface OverlapSources {
  readonly clusterSize: number;
  header(): Readonly<Qcow2Header>;
  /** Entries of the active L1 table (the cluster map's, which may differ from the header's while it grows). */
  l1Entries(): number;
  isL2Table(cluster: number): boolean;
  refcountTable(): { offset: number; clusters: number };
  isRefcountBlock(cluster: number): boolean;
  snapshots(): readonly Qcow2Snapshot[];
}

interface SpanKey {
  l1Offset: number;
  l1Entries: number;
  tableOffset: number;
  tableClusters: number;
  snapshotsOffset: number;
  snapshots: readonly Qcow2Snapshot[];
  bitmapsOffset: number;
  bitmapsBytes: number;
}

/** A structure spanning clusters [start, end). */
interface Span {
  start: number;
  end: number;
  name: OverlapName;
}

export class MetadataOverlap {
  private spans: Span[] = [];
  /** One past the last cluster of any span. */
  private spansEnd = 0;
  /** What the spans were built from (compared field by field: no garbage per check). */
  private key: SpanKey | undefined;

  constructor(private readonly src: OverlapSources) {}

  /**
   * The name of the most important metadata structure (QEMU's order) that a write of
   * [offset, offset + bytes) would overwrite, or undefined. Whole clusters are compared, as QEMU
   * compares them.
   */
  check(offset: number, bytes: number): OverlapName | undefined {
    if (bytes <= 0) return undefined;
    const cs = this.src.clusterSize;
    const first = Math.floor(offset / cs);
    const end = Math.floor((offset + bytes - 1) / cs) + 1;
    let best: OverlapName | undefined;
    const take = (n: OverlapName) => {
      if (best === undefined || RANK[n] < RANK[best]) best = n;
    };
    const spans = this.currentSpans();
    // An image growing at its end allocates past every span: one comparison.
    if (first < this.spansEnd) {
      for (const s of spans) {
        if (s.start >= end) break;
        if (s.end > first) take(s.name);
      }
    }
    // Single-cluster structures: one set lookup per cluster of the range (ranks 2 and 4).
    if (best === undefined || RANK[best] > RANK['active L2 table']) {
      for (let c = first; c < end; c++) {
        if (this.src.isL2Table(c)) {
          take('active L2 table');
          break;
        }
        if (this.src.isRefcountBlock(c)) take('refcount block');
      }
    }
    return best;
  }

  /** The multi-cluster structures sorted by start, rebuilt when any of them moved. */
  private currentSpans(): Span[] {
    const h = this.src.header();
    const rt = this.src.refcountTable();
    const snaps = this.src.snapshots();
    const l1 = this.src.l1Entries();
    const k = this.key;
    if (
      k !== undefined &&
      k.l1Offset === h.l1TableOffset &&
      k.l1Entries === l1 &&
      k.tableOffset === rt.offset &&
      k.tableClusters === rt.clusters &&
      k.snapshotsOffset === h.snapshotsOffset &&
      k.snapshots === snaps &&
      k.bitmapsOffset === (h.bitmaps?.directoryOffset ?? 0) &&
      k.bitmapsBytes === (h.bitmaps?.directorySize ?? 0)
    ) {
      return this.spans;
    }
    const cs = this.src.clusterSize;
    const spans: Span[] = [{ start: 0, end: 1, name: 'qcow2_header' }];
    const add = (offset: number, bytes: number, name: OverlapName) => {
      if (bytes > 0 && offset > 0) spans.push({ start: Math.floor(offset / cs), end: Math.ceil((offset + bytes) / cs), name });
    };
    add(h.l1TableOffset, l1 * 8, 'active L1 table');
    add(rt.offset, rt.clusters * cs, 'refcount table');
    if (snaps.length > 0) add(h.snapshotsOffset, storedSnapshotTableLength(snaps), 'snapshot table');
    for (const s of snaps) add(s.l1TableOffset, s.l1Size * 8, 'inactive L1 table');
    if (h.bitmaps) add(h.bitmaps.directoryOffset, h.bitmaps.directorySize, 'bitmap directory');
    spans.sort((a, b) => a.start - b.start);
    this.spans = spans;
    this.spansEnd = spans.reduce((m, s) => Math.max(m, s.end), 0);
    this.key = { l1Offset: h.l1TableOffset, l1Entries: l1, tableOffset: rt.offset, tableClusters: rt.clusters, snapshotsOffset: h.snapshotsOffset, snapshots: snaps, bitmapsOffset: h.bitmaps?.directoryOffset ?? 0, bitmapsBytes: h.bitmaps?.directorySize ?? 0 };
    return spans;
  }
}

/** QEMU's message for a write refused by the check. */
export const overlapMessage = (name: OverlapName): string => `Preventing invalid write on metadata (overlaps with ${name})`;

/**
 * The allocator's guard (AllocatorHooks.vet): QEMU's message when [offset, +bytes) may not be
 * handed out. Offset 0 for a named structure gets QEMU's own wording for it (its L2, refcount block
 * and compressed allocations refuse offset 0 before any write); anything else is refused as the
 * write onto the metadata it would be.
 */
export function vetAllocation(overlap: MetadataOverlap, offset: number, bytes: number, what?: string): string | undefined {
  if (offset === 0 && what !== undefined) return `Preventing invalid allocation of ${what} at offset 0`;
  const name = overlap.check(offset, bytes);
  return name === undefined ? undefined : overlapMessage(name);
}
