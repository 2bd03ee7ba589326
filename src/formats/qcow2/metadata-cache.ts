/**
 * The qcow2 metadata cache: tables (L2 tables or slices of them) held as Uint8Arrays keyed by host
 * offset, evicted least-recently-used once the byte budget is exceeded. Tables may be marked dirty;
 * a dirty table is written back through `writeBack` before it is evicted, and on `flush()`.
 *
 * Write-back dependency, as QEMU states it on its cache (qcow2_cache_set_dependency): refcount
 * blocks before the L2 tables that need them. An L2 entry on disk must never name a cluster whose
 * refcount is not on disk yet, so before any dirty table is written, `dependsOn` runs and makes
 * the refcounts (and the data the new entries point at) durable. The cluster map sets it to the
 * allocator's write-back when the image is writable; a read-only image never dirties a table.
 *
 * Refcount blocks have their own cache inside the allocator (alloc.ts) for now; the mechanism here
 * is meant to become the one LRU for both once the core LRU exists.
 *
 * API: `get(offset)`, `peek(offset)`, `put(offset, data, dirty)`, `markDirty(offset)`, `flush()`,
 * `drop(offset)`, `clear()`. Concurrent `get`s of one table share one load.
 */
export interface TableCacheOptions {
  tableBytes: number;
  budgetBytes: number;
  load(offset: number, into: Uint8Array): Promise<void>;
  writeBack?(offset: number, data: Uint8Array): Promise<void>;
  /** What must be on disk before any dirty table is written back (see above). */
  dependsOn?(): Promise<void>;
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

  private dependency: (() => Promise<void>) | undefined;

  constructor(private readonly options: TableCacheOptions) {
    this.dependency = options.dependsOn;
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

  /** State (or replace) what must reach the disk before any table is written back. */
  setDependency(dependsOn: () => Promise<void>): void {
    this.dependency = dependsOn;
  }

  private async writeBack(t: CachedTable): Promise<void> {
    if (!this.options.writeBack) throw new Error('table cache has dirty tables but no write-back hook');
    if (this.dependency) await this.dependency();
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
