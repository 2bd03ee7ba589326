/**
 * A bounded cache of L2 tables, keyed by host offset, least recently used first out. Tables are
 * written through by the device (the cache never holds unwritten changes), so eviction is just
 * forgetting. Concurrent misses for one table share one load.
 */
export class L2Cache {
  private readonly tables = new Map<number, BigUint64Array>();
  private readonly loading = new Map<number, Promise<BigUint64Array>>();
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

  /** Insert or refresh a table (a writer's authoritative copy). */
  put(offset: number, table: BigUint64Array): void {
    this.tables.delete(offset);
    this.tables.set(offset, table);
    while (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next().value as number;
      this.tables.delete(oldest);
    }
  }

  clear(): void {
    this.tables.clear();
  }
}
