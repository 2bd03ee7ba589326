/**
 * What a streamed qcow2 image will hold, decided from the source's allocation alone (block status,
 * no data read) before its first byte is written: which target clusters hold data, which read as
 * zeros through a zero flag, which are left to the backing file, and so where every cluster goes.
 *
 * A stream cannot seek back, so the header, refcounts, L1 and every L2 table must be right when
 * they are written, ahead of the data they describe. Hence one rule that differs from a convert to
 * a file: a cluster the source stores as data is allocated even if its bytes turn out to be zeros
 * (qemu-img would look at them and leave them sparse). Looking first would mean reading the source
 * twice; in a stream those bytes cost the same either way.
 *
 * Memory: one 32-bit count per L2 table of the image (a 4 TiB image with 64 KiB clusters: 8192).
 */
import type { BlockDevice } from '../core/block-device.js';
import { throwIfAborted } from '../core/errors.js';
import type { ChainExtent } from '../ops/chain-status.js';
import { ConcatSource } from '../ops/concat.js';

/** What one target cluster becomes. */
export enum ClusterKind {
  /** Left unallocated: reads from the backing file (or zeros without one). */
  None = 0,
  /** A zero cluster (v3 zero flag): reads as zeros whatever the backing file holds. */
  Zero = 1,
  /** Allocated, its bytes read from the source. */
  Data = 2,
}

/**
 * How source extents map to target cluster kinds. `backingDepth`: the depth in the source's chain
 * of the image the target names as its backing file (its clusters need not be copied), or -1
 * when the target has a backing file that is not in the source's chain (every cluster the source
 * does not store must then read as zeros), or undefined without a backing file.
 */
export interface KindRules {
  backingDepth?: number;
  /** v2 images have no zero flag: clusters that must read as zeros are written as data. */
  zeroFlag: boolean;
}

/** The kind one source extent asks for, before clusters combine extents. */
export function extentKind(e: ChainExtent, rules: KindRules): ClusterKind {
  const zero = !e.present || e.zero;
  let kind: ClusterKind;
  if (rules.backingDepth === undefined) kind = zero ? ClusterKind.None : ClusterKind.Data;
  else if (rules.backingDepth >= 0) {
    // From the backing file or below it (or absent in the whole chain): the target reads the same.
    if (!e.present || e.depth >= rules.backingDepth) return ClusterKind.None;
    kind = zero ? ClusterKind.Zero : ClusterKind.Data;
  } else kind = zero ? ClusterKind.Zero : ClusterKind.Data;
  return kind === ClusterKind.Zero && !rules.zeroFlag ? ClusterKind.Data : kind;
}

/** Two parts of one cluster: any data, or a part that must be zero beside one left to the backing, needs the cluster's bytes. */
function combine(a: ClusterKind, b: ClusterKind): ClusterKind {
  if (a === b) return a;
  return ClusterKind.Data;
}

/**
 * Walk the source's status over [from, to) (cluster aligned except at the image end) and call
 * `each(firstCluster, count, kind)` for runs of clusters of one kind, in order.
 */
export async function walkClusters(
  src: ConcatSource,
  from: number,
  to: number,
  clusterSize: number,
  rules: KindRules,
  each: (first: number, count: number, kind: ClusterKind) => void,
  signal?: AbortSignal,
): Promise<void> {
  // A cluster that started inside an earlier extent: its index and the kind so far.
  let pending = -1;
  let pendingKind = ClusterKind.None;
  for (let off = from; off < to; ) {
    throwIfAborted(signal);
    const e = await src.status(off, to - off);
    const kind = extentKind(e, rules);
    const end = off + e.length;
    let start = off;
    if (pending >= 0) {
      pendingKind = combine(pendingKind, kind);
      const cEnd = Math.min((pending + 1) * clusterSize, to);
      if (end < cEnd) {
        off = end;
        continue;
      }
      each(pending, 1, pendingKind);
      pending = -1;
      start = cEnd;
    }
    // `start` is cluster aligned here: whole clusters, then the beginning of a partial one.
    const first = start / clusterSize;
    const whole = Math.floor(end / clusterSize) - first;
    if (whole > 0) each(first, whole, kind);
    const tailStart = (first + Math.max(0, whole)) * clusterSize;
    if (tailStart < end) {
      if (end >= to) each(tailStart / clusterSize, 1, kind); // the image ends inside this cluster
      else {
        pending = tailStart / clusterSize;
        pendingKind = kind;
      }
    }
    off = end;
  }
}

/** Per L2 table: the data clusters it maps, and whether it exists at all. */
export interface StreamPlan {
  /** Data clusters in the guest range of each L1 entry. */
  dataPerTable: Uint32Array;
  /** Whether each L1 entry needs an L2 table (it maps data or zero clusters). */
  hasTable: Uint8Array;
  tables: number;
  dataClusters: number;
}

/** Pass one: count per L2 table, from block status only. */
export async function planClusters(
  sources: BlockDevice[],
  clusterSize: number,
  l2Coverage: number,
  l1Entries: number,
  rules: KindRules,
  signal?: AbortSignal,
): Promise<StreamPlan> {
  const src = new ConcatSource(sources);
  const perTable = l2Coverage / clusterSize;
  const dataPerTable = new Uint32Array(l1Entries);
  const hasTable = new Uint8Array(l1Entries);
  await walkClusters(src, 0, src.size, clusterSize, rules, (first, count, kind) => {
    if (kind === ClusterKind.None) return;
    // A run may cross several tables.
    for (let c = first; c < first + count; ) {
      const t = Math.floor(c / perTable);
      const n = Math.min(first + count, (t + 1) * perTable) - c;
      hasTable[t] = 1;
      if (kind === ClusterKind.Data) dataPerTable[t]! += n;
      c += n;
    }
  }, signal);
  let tables = 0;
  let dataClusters = 0;
  for (let t = 0; t < l1Entries; t++) {
    tables += hasTable[t]!;
    dataClusters += dataPerTable[t]!;
  }
  return { dataPerTable, hasTable, tables, dataClusters };
}
