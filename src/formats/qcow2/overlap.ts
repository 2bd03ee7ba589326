/**
 * Metadata overlap checks, as QEMU's qcow2 makes them (its `overlap-check` option, default
 * "cached"): a newly allocated host range must not hold the header, the active L1 table, an active
 * L2 table, the refcount table, a refcount block, the snapshot table, a snapshot's L1 table or the
 * bitmap directory (and, when asked, a snapshot's L2 table). The allocator trusts the refcounts; on an image whose refcounts are corrupt
 * (counts of metadata clusters zeroed by hand) it would otherwise hand out a cluster that holds
 * metadata, and the write would overwrite it. QEMU then fails the write and marks the image
 * corrupt; so do we (the allocator throws a CorruptionEvent, the writer marks the image).
 *
 * Cheap by construction, as the check runs at every allocation: no I/O, and no scan of whole
 * tables per check. The L2 tables and refcount blocks are sets their owners keep up to date
 * (ClusterMap.isL2Table, Refcounts.isRefcountBlock); the few multi-cluster structures are a small
 * sorted list, rebuilt only when one of them moves (its key changes).
 *
 * Which structures are checked is QEMU's `overlap-check` option (OverlapCheckOptions): a level
 * (none, constant, cached, all) and per-structure switches over it. The inactive L2 tables (level
 * "all", or `overlap-check.inactive-l2=on`) are named by the snapshots' L1 tables, which QEMU reads
 * and validates at each check; we read them once per snapshot table (loadInactiveL2, before a
 * request, as snapshot L1 tables change only with the table). A snapshot L1 table QEMU's
 * validation refuses makes every check fail with its errno (EFBIG, EINVAL): the write is refused,
 * and the image is not marked corrupt, as QEMU's is not.
 */
import type { OverlapCheck, OverlapCheckOptions } from '../../core/block-device.js';
import { QcowError } from '../../core/errors.js';
import { MAX_L1_BYTES } from './layout.js';
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
  'inactive L2 table',
  'bitmap directory',
] as const;
export type OverlapName = (typeof OVERLAP_NAMES)[number];

const RANK: Record<OverlapName, number> = Object.fromEntries(OVERLAP_NAMES.map((n, i) => [n, i])) as Record<OverlapName, number>;

/** QEMU's option names of the structures (`overlap-check.<name>`), in OVERLAP_NAMES's order. */
export const OVERLAP_CHECKS: readonly OverlapCheck[] = [
  'main-header',
  'active-l1',
  'active-l2',
  'refcount-table',
  'refcount-block',
  'snapshot-table',
  'inactive-l1',
  'inactive-l2',
  'bitmap-directory',
];

const CONSTANT: readonly OverlapCheck[] = ['main-header', 'active-l1', 'refcount-table', 'snapshot-table', 'bitmap-directory'];
const CACHED: readonly OverlapCheck[] = [...CONSTANT, 'active-l2', 'refcount-block', 'inactive-l1'];
const LEVELS: Record<NonNullable<OverlapCheckOptions['level']>, readonly OverlapCheck[]> = { none: [], constant: CONSTANT, cached: CACHED, all: OVERLAP_CHECKS };

/** The structures checked under `options`, as a bit mask over OVERLAP_NAMES's ranks. */
export function overlapMask(options: OverlapCheckOptions = {}): number {
  let mask = 0;
  for (const c of LEVELS[options.level ?? 'cached']) mask |= 1 << OVERLAP_CHECKS.indexOf(c);
  for (const [c, on] of Object.entries(options.checks ?? {})) {
    const bit = 1 << OVERLAP_CHECKS.indexOf(c as OverlapCheck);
    if (on === true) mask |= bit;
    else if (on === false) mask &= ~bit;
  }
  return mask;
}

const bit = (n: OverlapName) => 1 << RANK[n];
/** Looked at for every request (inactiveL2Stale): computed once. */
const INACTIVE_L2 = bit('inactive L2 table');

/** What the inactive L2 check knows: the clusters the snapshots' L1 tables name, or why it fails. */
type InactiveL2 = { clusters: Set<number> } | { refusal: QcowError };

/** What the check reads: each piece from its one owner. */
export interface OverlapSources {
  readonly clusterSize: number;
  header(): Readonly<Qcow2Header>;
  /** Entries of the active L1 table (the cluster map's, which may differ from the header's while it grows). */
  l1Entries(): number;
  isL2Table(cluster: number): boolean;
  refcountTable(): { offset: number; clusters: number };
  isRefcountBlock(cluster: number): boolean;
  /**
   * A cluster index at or above which neither isL2Table nor isRefcountBlock can say true (an upper
   * bound; optional). Data allocated at the end of a growing image lies above it, and its check
   * then skips the per-cluster questions: two set lookups per cluster were most of the guard's
   * cost in a convert into qcow2.
   */
  singleClustersEnd?(): number;
  snapshots(): readonly Qcow2Snapshot[];
  /** Read image bytes (a snapshot's L1 table, for the inactive L2 check); past the end reads zeros. */
  read?(offset: number, into: Uint8Array): Promise<unknown>;
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
  /** The structures checked (overlapMask). */
  private readonly mask: number;
  /** The inactive L2 tables, for the snapshot table `inactiveOf` (loadInactiveL2). */
  private inactive: InactiveL2 | undefined;
  private inactiveOf: readonly Qcow2Snapshot[] | undefined;
  /**
   * The refusal of an allocation, when one was refused for a snapshot L1 table the validation
   * refused: QEMU had updated the refcounts in its cache by then, and fails to write them back at
   * close too (see Qcow2Writer.close).
   */
  refusedAllocation: QcowError | undefined;

  constructor(
    private readonly src: OverlapSources,
    options?: OverlapCheckOptions,
  ) {
    this.mask = overlapMask(options);
  }

  /** Whether the inactive L2 tables must be loaded (loadInactiveL2) before the next check. */
  get inactiveL2Stale(): boolean {
    return (this.mask & INACTIVE_L2) !== 0 && this.inactiveOf !== this.src.snapshots();
  }

  /**
   * Read the snapshots' L1 tables for the inactive L2 check, validated as QEMU validates them at
   * each check (qcow2_validate_table): too large is EFBIG, an offset not cluster aligned or past
   * what a file can hold EINVAL. Needed when inactiveL2Stale says so.
   */
  async loadInactiveL2(): Promise<void> {
    const snaps = this.src.snapshots();
    const cs = this.src.clusterSize;
    const clusters = new Set<number>();
    let state: InactiveL2 = { clusters };
    for (const s of snaps) {
      if (s.l1Size > MAX_L1_BYTES / 8) {
        state = { refusal: new QcowError('QCOW_CORRUPT', `snapshot '${s.name}' L1 table too large`, { errno: 'EFBIG' }) };
        break;
      }
      if (Number.MAX_SAFE_INTEGER - s.l1Size * 8 < s.l1TableOffset || s.l1TableOffset % cs !== 0) {
        state = { refusal: new QcowError('QCOW_CORRUPT', `snapshot '${s.name}' L1 table offset invalid`, { errno: 'EINVAL' }) };
        break;
      }
      if (s.l1Size === 0 || !this.src.read) continue;
      const l1 = new Uint8Array(s.l1Size * 8);
      await this.src.read(s.l1TableOffset, l1);
      const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
      for (let i = 0; i < s.l1Size; i++) {
        // The offset bits of an L1 entry (QEMU's L1E_OFFSET_MASK).
        const off = Number(view.getBigUint64(i * 8) & 0x00fffffffffffe00n);
        if (off !== 0) clusters.add(Math.floor(off / cs));
      }
    }
    this.inactive = state;
    this.inactiveOf = snaps;
  }

  /**
   * Why every metadata write is refused, when the inactive L2 check is on and a snapshot's L1
   * table fails QEMU's validation (loadInactiveL2): the error to fail the request with.
   */
  get refusal(): QcowError | undefined {
    const s = this.inactive;
    return (this.mask & INACTIVE_L2) !== 0 && s !== undefined && 'refusal' in s ? s.refusal : undefined;
  }

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
    const mask = this.mask;
    const spans = this.currentSpans();
    // An image growing at its end allocates past every span: one comparison.
    if (first < this.spansEnd) {
      for (const s of spans) {
        if (s.start >= end) break;
        if (s.end > first && (mask & bit(s.name)) !== 0) take(s.name);
      }
    }
    // Single-cluster structures: one set lookup per cluster of the range (ranks 2 and 4).
    const l2 = (mask & bit('active L2 table')) !== 0;
    const blocks = (mask & bit('refcount block')) !== 0;
    if ((l2 || blocks) && (best === undefined || RANK[best] > RANK['active L2 table']) && first < (this.src.singleClustersEnd?.() ?? Infinity)) {
      for (let c = first; c < end; c++) {
        if (l2 && this.src.isL2Table(c)) {
          take('active L2 table');
          break;
        }
        if (blocks && this.src.isRefcountBlock(c)) take('refcount block');
      }
    }
    const inactive = this.inactive;
    if ((mask & INACTIVE_L2) !== 0 && inactive !== undefined && 'clusters' in inactive && (best === undefined || RANK[best] > RANK['inactive L2 table'])) {
      for (let c = first; c < end; c++) {
        if (inactive.clusters.has(c)) {
          take('inactive L2 table');
          break;
        }
      }
    }
    return best;
  }

  /**
   * check(), with the refusal (see `refusal`) where QEMU meets it: at the inactive L2 tables' turn,
   * so a range onto a structure checked before them is still named.
   */
  vet(offset: number, bytes: number): OverlapName | QcowError | undefined {
    const name = this.check(offset, bytes);
    const refusal = this.refusal;
    if (refusal !== undefined && bytes > 0 && (name === undefined || RANK[name] > RANK['inactive L2 table'])) return refusal;
    return name;
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
export function vetAllocation(overlap: MetadataOverlap, offset: number, bytes: number, what?: string): string | QcowError | undefined {
  if (offset === 0 && what !== undefined) return `Preventing invalid allocation of ${what} at offset 0`;
  // A new L2 table: QEMU writes the allocation's refcount block back first, and that write is
  // refused before the table's own is checked. Anything else: the new cluster's write is checked.
  const refusal = overlap.refusal;
  const found = what === 'L2 table' && refusal !== undefined ? refusal : overlap.vet(offset, bytes);
  if (found instanceof QcowError) {
    overlap.refusedAllocation = found;
    return found;
  }
  return found === undefined ? undefined : overlapMessage(found);
}
