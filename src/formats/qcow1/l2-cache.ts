import { Lru } from '../../core/lru.js';

/**
 * A bounded cache of L2 tables, keyed by host offset, least recently used first out. A table
 * whose changes are not on disk yet is pinned by the device and never evicted until unpinned;
 * every other table matches the disk, so eviction is just forgetting. Concurrent misses for one
 * table share one load, and a load racing a `put` (or `clear`) of its table is not stored: the
 * writer's copy wins. The mechanism is core/lru.ts; pinning is the policy here.
 */
export class L2Cache {
  private readonly lru: Lru<number, BigUint64Array>;
  private readonly pinned = new Set<number>();
  readonly capacity: number;

  /** `budgetBytes` is the memory allowed; at least one table is always kept. */
  constructor(
    readonly tableBytes: number,
    budgetBytes: number,
  ) {
    this.capacity = Math.max(1, Math.floor(budgetBytes / tableBytes));
    this.lru = new Lru({ budget: this.capacity, canEvict: (offset) => !this.pinned.has(offset) });
  }

  get size(): number {
    return this.lru.size;
  }

  get(offset: number, load: (offset: number) => Promise<BigUint64Array>): Promise<BigUint64Array> {
    return this.lru.load(offset, load);
  }

  /** Insert or refresh a table (a writer's authoritative copy); `pin` keeps it until unpinAll(). */
  put(offset: number, table: BigUint64Array, pin = false): void {
    if (pin) this.pinned.add(offset);
    this.lru.set(offset, table);
  }

  get pinnedCount(): number {
    return this.pinned.size;
  }

  unpinAll(): void {
    this.pinned.clear();
    this.lru.trim();
  }

  clear(): void {
    this.lru.clear();
    this.pinned.clear();
  }
}
