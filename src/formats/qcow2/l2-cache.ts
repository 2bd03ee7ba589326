/**
 * A bounded cache of metadata tables (L2 tables; the writer may reuse it for refcount blocks),
 * each one cluster held as a Uint8Array, keyed by host offset, evicted least-recently-used once
 * the byte budget is exceeded. Tables may be marked dirty; a dirty table is written back through
 * the `writeBack` hook before it is evicted, and on `flush()`.
 *
 * API: `get(offset)`, `put(offset, data, dirty)`, `markDirty(offset)`, `flush()`, `drop(offset)`,
 * `clear()`. Concurrent `get`s of one table share one load.
 */
export interface TableCacheOptions {
  tableBytes: number;
  budgetBytes: number;
  load(offset: number, into: Uint8Array): Promise<void>;
  writeBack?(offset: number, data: Uint8Array): Promise<void>;
}

export interface CachedTable {
  readonly offset: number;
  readonly data: Uint8Array;
  dirty: boolean;
}

export class TableCache {
  /** Map order is recency order: the first entry is the least recently used. */
  private readonly tables = new Map<number, CachedTable>();
  private readonly loading = new Map<number, Promise<CachedTable>>();
  private readonly maxTables: number;

  constructor(private readonly options: TableCacheOptions) {
    // Always keep a few tables, or a read that spans two tables would thrash.
    this.maxTables = Math.max(4, Math.floor(options.budgetBytes / options.tableBytes));
  }

  get size(): number {
    return this.tables.size;
  }

  /**
   * The table if it is cached (marked recently used), else undefined: lets hot paths stay
   * synchronous when the table is there, instead of a promise per lookup.
   */
  peek(offset: number): CachedTable | undefined {
    const hit = this.tables.get(offset);
    if (hit) {
      this.tables.delete(offset);
      this.tables.set(offset, hit);
    }
    return hit;
  }

  async get(offset: number): Promise<CachedTable> {
    const hit = this.tables.get(offset);
    if (hit) {
      this.tables.delete(offset);
      this.tables.set(offset, hit);
      return hit;
    }
    let p = this.loading.get(offset);
    if (!p) {
      p = this.load(offset);
      this.loading.set(offset, p);
    }
    return p;
  }

  private async load(offset: number): Promise<CachedTable> {
    try {
      const data = new Uint8Array(this.options.tableBytes);
      await this.options.load(offset, data);
      const t: CachedTable = { offset, data, dirty: false };
      await this.insert(t);
      return t;
    } finally {
      this.loading.delete(offset);
    }
  }

  /** Add a table the caller made (a newly allocated one). */
  async put(offset: number, data: Uint8Array, dirty: boolean): Promise<CachedTable> {
    const t: CachedTable = { offset, data, dirty };
    this.tables.delete(offset);
    await this.insert(t);
    return t;
  }

  markDirty(offset: number): void {
    const t = this.tables.get(offset);
    if (!t) throw new Error(`table at 0x${offset.toString(16)} is not cached`);
    t.dirty = true;
  }

  private async insert(t: CachedTable): Promise<void> {
    this.tables.set(t.offset, t);
    while (this.tables.size > this.maxTables) {
      const [oldOffset, old] = this.tables.entries().next().value as [number, CachedTable];
      this.tables.delete(oldOffset);
      if (old.dirty) await this.writeBack(old);
    }
  }

  private async writeBack(t: CachedTable): Promise<void> {
    if (!this.options.writeBack) throw new Error('table cache has dirty tables but no write-back hook');
    await this.options.writeBack(t.offset, t.data);
    t.dirty = false;
  }

  async flush(): Promise<void> {
    for (const t of [...this.tables.values()]) if (t.dirty) await this.writeBack(t);
  }

  /** Forget a table (freed or rewritten elsewhere); a dirty one is dropped unwritten. */
  drop(offset: number): void {
    this.tables.delete(offset);
  }

  clear(): void {
    this.tables.clear();
  }
}
