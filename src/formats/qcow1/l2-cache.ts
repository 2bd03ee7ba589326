/**
 * A bounded cache of L2 tables, keyed by host offset, least recently used first out. A table
 * whose changes are not on disk yet is pinned by the device and never evicted until unpinned;
 * every other table matches the disk, so eviction is just forgetting. Concurrent misses for one
 * table share one load.
 */
export class L2Cache {
  private readonly tables = new Map<number, BigUint64Array>();
  private readonly loading = new Map<number, Promise<BigUint64Array>>();
  private readonly pinned = new Set<number>();
  readonly capacity: number;

  /** `budgetBytes` is the memory allowed; at least one table is always kept. */
  constructor(
    readonly tableBytes: number,
    budgetBytes: number,
  ) {
    this.capacity = Math.max(1, Math.floor(budgetBytes / tableBytes));
  }

  get size(): number {
    return this.tables.size;
  }

  async get(offset: number, load: (offset: number) => Promise<BigUint64Array>): Promise<BigUint64Array> {
    const hit = this.tables.get(offset);
    if (hit) {
      this.tables.delete(offset); // re-insert: Map order is the recency order
      this.tables.set(offset, hit);
      return hit;
    }
    let pending = this.loading.get(offset);
    if (!pending) {
      pending = load(offset).then(
        (table) => {
          this.loading.delete(offset);
          // A writer may have put a newer copy while this load was in flight; that one wins.
          const current = this.tables.get(offset);
          if (current) return current;
          this.put(offset, table);
          return table;
        },
        (e: unknown) => {
          this.loading.delete(offset);
          throw e;
        },
      );
      this.loading.set(offset, pending);
    }
    return pending;
  }

  /** Insert or refresh a table (a writer's authoritative copy); `pin` keeps it until unpinAll(). */
  put(offset: number, table: BigUint64Array, pin = false): void {
    this.tables.delete(offset);
    this.tables.set(offset, table);
    if (pin) this.pinned.add(offset);
    this.trim();
  }

  /** Forget the least recently used unpinned tables until the cache is within its capacity. */
  private trim(): void {
    if (this.tables.size <= this.capacity) return;
    for (const key of this.tables.keys()) {
      if (this.tables.size <= this.capacity) break;
      if (!this.pinned.has(key)) this.tables.delete(key);
    }
  }

  get pinnedCount(): number {
    return this.pinned.size;
  }

  unpinAll(): void {
    this.pinned.clear();
    this.trim();
  }

  clear(): void {
    this.tables.clear();
    this.pinned.clear();
  }
}
