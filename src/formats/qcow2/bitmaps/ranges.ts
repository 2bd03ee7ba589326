/**
 * A set of guest byte ranges, kept sorted and merged: the writes since the bitmaps were last
 * brought up to date. Bounded by the caller (see PersistentBitmaps.mark), which applies and
 * empties it when it grows past its budget.
 */
export class RangeSet {
  private starts: number[] = [];
  private ends: number[] = [];

  get count(): number {
    return this.starts.length;
  }

  add(start: number, end: number): void {
    if (end <= start) return;
    const s = this.starts;
    const e = this.ends;
    // First range whose end reaches start (ranges that touch are merged too).
    let lo = 0;
    let hi = s.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (e[mid]! < start) lo = mid + 1;
      else hi = mid;
    }
    let j = lo;
    let ns = start;
    let ne = end;
    while (j < s.length && s[j]! <= end) {
      ns = Math.min(ns, s[j]!);
      ne = Math.max(ne, e[j]!);
      j++;
    }
    s.splice(lo, j - lo, ns);
    e.splice(lo, j - lo, ne);
  }

  /** The ranges, in order, and the set emptied. */
  take(): Array<[number, number]> {
    const out = this.starts.map((s, i): [number, number] => [s, this.ends[i]!]);
    this.starts = [];
    this.ends = [];
    return out;
  }
}
