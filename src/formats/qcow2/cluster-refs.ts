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
   * The first cluster of [from, end) whose count differs from its stored count in `block`, a
   * refcount block of `bits`-wide counts whose entry 0 is cluster `base`, or `end`. Clusters whose
   * count is kept in the Map, and those past the array, are reported as differing: the caller
   * looks at them one by one. One loop per width, so that every width passes the clusters that
   * agree without a call per cluster.
   */
  sameAsStored(block: Uint8Array, bits: number, base: number, from: number, end: number): number {
    // Each width's loop is a function of its own: a check runs once, cold, and V8 compiles the
    // loop it spends its time in (on-stack replacement) as the whole function around it; one
    // function holding all five loops cost twice the compiler's memory and time of the one used.
    const stop = Math.min(end, this.counts.length);
    const i = from - base;
    switch (bits) {
      case 16:
        return same16(this.counts, block, from, stop, i);
      case 8:
        return same8(this.counts, block, from, stop, i);
      case 32:
      case 64:
        return sameWide(this.counts, block, from, stop, i, bits / 8);
      default:
        return samePacked(this.counts, block, from, stop, i, bits);
    }
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

// The loops of ClusterRefs.sameAsStored, one per layout of a refcount block: the first cluster of
// [c, stop) whose count differs from entry i, i + 1, ... of the block, or stop. A count of 0xffff
// (kept in the Map) always differs.

function same16(counts: Uint16Array, block: Uint8Array, c: number, stop: number, i: number): number {
  for (let k = 2 * i; c < stop; c++, k += 2) {
    const n = counts[c]!;
    if (n === 0xffff || n !== ((block[k]! << 8) | block[k + 1]!)) return c;
  }
  return c;
}

function same8(counts: Uint16Array, block: Uint8Array, c: number, stop: number, i: number): number {
  for (; c < stop; c++, i++) if (counts[c] !== block[i]) return c;
  return c;
}

/** 32- and 64-bit counts (`bytes` 4 or 8): all but the last two bytes must be zero (the array holds counts below 0xffff). */
function sameWide(counts: Uint16Array, block: Uint8Array, c: number, stop: number, i: number, bytes: number): number {
  for (let k = i * bytes; c < stop; c++, k += bytes) {
    const n = counts[c]!;
    if (n === 0xffff || n !== ((block[k + bytes - 2]! << 8) | block[k + bytes - 1]!)) return c;
    for (let z = k; z < k + bytes - 2; z++) if (block[z] !== 0) return c;
  }
  return c;
}

/** 1-, 2- and 4-bit counts, packed into bytes with the first entry in the least significant bits. */
function samePacked(counts: Uint16Array, block: Uint8Array, c: number, stop: number, i: number, bits: number): number {
  const shift = bits === 1 ? 3 : bits === 2 ? 2 : 1;
  const low = (1 << shift) - 1;
  const mask = (1 << bits) - 1;
  for (; c < stop; c++, i++) if (counts[c] !== ((block[i >> shift]! >> ((i & low) * bits)) & mask)) return c;
  return c;
}
