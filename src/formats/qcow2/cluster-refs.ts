/**
 * How many references each cluster of an image file receives, as `check` counts them.
 *
 * One 16-bit counter per cluster of the file, as qemu-img check keeps them: a Map entry per
 * cluster cost ~20x the memory and most of a check's time in garbage collection, and the spread
 * of its keys into Math.max failed ("Maximum call stack size exceeded") past ~120 000 clusters.
 * Counts that do not fit, and clusters past the end of the file (a compressed cluster's last
 * sectors may reach beyond it; corrupt tables point anywhere), are kept in a Map on the side.
 */
export class ClusterRefs {
  private readonly counts: Uint16Array;
  private readonly extra = new Map<number, number>();
  private top = -1;
  private most = 0;

  /** `clusters`: the clusters the file holds (the counters kept in the array). */
  constructor(clusters: number) {
    this.counts = new Uint16Array(Math.max(0, clusters));
  }

  /** One more reference to every cluster of [first, last]. */
  addRange(first: number, last: number): void {
    // Counts well below the cap, the usual case, are bumped in place; the rest go through add().
    const counts = this.counts;
    const inArray = Math.min(last + 1, counts.length);
    let most = this.most;
    let c = first;
    for (; c < inArray; c++) {
      const n = counts[c]!;
      if (n < 0xfffe) {
        counts[c] = n + 1;
        if (n >= most) most = n + 1;
      } else this.add(c);
    }
    if (most > this.most) this.most = most;
    for (; c <= last; c++) this.add(c);
    if (last > this.top) this.top = last;
  }

  private add(c: number): void {
    const counts = this.counts;
    let n: number;
    if (c < counts.length && counts[c]! < 0xffff) {
      n = ++counts[c]!;
      if (n === 0xffff) {
        // From here on the Map holds this cluster's count.
        this.extra.set(c, 0xffff);
      }
    } else {
      n = (this.extra.get(c) ?? 0) + 1;
      this.extra.set(c, n);
    }
    if (n > this.most) this.most = n;
  }

  /** References to cluster `c`. */
  get(c: number): number {
    if (c < this.counts.length) {
      const n = this.counts[c]!;
      return n === 0xffff ? this.extra.get(c)! : n;
    }
    return this.extra.get(c) ?? 0;
  }

  /** The most references any cluster has (no count is higher: a run below a cap needs no look at each). */
  get peak(): number {
    return this.most;
  }

  /**
   * The first cluster of [from, end) whose count differs from its stored 16-bit big-endian count
   * in `block` (whose entry 0 is cluster `base`), or `end`. Clusters whose count is kept in the
   * Map, and those past the array, are reported as differing: the caller looks at them one by one.
   */
  sameAsStored16(block: Uint8Array, base: number, from: number, end: number): number {
    const counts = this.counts;
    const stop = Math.min(end, counts.length);
    let c = from;
    for (let i = 2 * (from - base); c < stop; c++, i += 2) {
      const n = counts[c]!;
      if (n === 0xffff || n !== ((block[i]! << 8) | block[i + 1]!)) return c;
    }
    return c;
  }

  /** The last cluster of [from, end) with a reference, or -1 (clusters of the array only). */
  lastReferenced(from: number, end: number): number {
    const counts = this.counts;
    for (let c = Math.min(end, counts.length) - 1; c >= from; c--) if (counts[c] !== 0) return c;
    return -1;
  }

  /** The highest cluster with a reference, or -1. */
  get highest(): number {
    return this.top;
  }

  /** [cluster, references] of every referenced cluster at or past `start`, in order. */
  countsFrom(start: number): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (let c = start; c < this.counts.length; c++) if (this.counts[c] !== 0) out.push([c, this.get(c)]);
    for (const [c, n] of this.extra) if (c >= Math.max(start, this.counts.length)) out.push([c, n]);
    return out.sort((a, b) => a[0] - b[0]);
  }

  /** Whether any cluster of [first, end) has a reference. */
  anyIn(first: number, end: number): boolean {
    const counts = this.counts;
    for (let c = first; c < Math.min(end, counts.length); c++) if (counts[c] !== 0) return true;
    if (end > counts.length) for (const c of this.extra.keys()) if (c >= first && c < end) return true;
    return false;
  }
}
