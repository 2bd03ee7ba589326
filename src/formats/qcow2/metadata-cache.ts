import { Lru } from '../../core/lru.js';

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
 * The mechanism (recency, merged loads, loads racing a put, the eviction hook) is core/lru.ts, as
 * for the refcount blocks in alloc.ts; the policy here is write-back: eviction is least recently
 * used, a dirty table being written back (after the dependency) before it is dropped, and staying
 * in the cache while that write runs, so a reader meanwhile gets the memory copy and never the disk
 * copy being overwritten. A load racing a `put` or `drop` of its table is not stored: the newer
 * table stands.
 *
 * Who may write back: only the writer, with its lock held (`getForWrite`, `put`, `changed`,
 * `flush`, and the trims it runs for readers through `scheduleWriteBack`). Guest writes change
 * tables and refcounts in place without a lock turn when the lock is free (write.ts writeNow), so
 * a write-back run beside them (as one started by a reader's eviction was) could write entries
 * made while its dependency ran, after the refcounts it made durable: a kill then left an L2 entry
 * naming a cluster whose refcount on disk is 0. Under the lock nothing changes between the
 * dependency and the table write (nor while the refcounts are written), and the write is awaited
 * by the lock holder, so the table's bytes need no copy. A reader (`get`) therefore drops clean
 * tables only; when only dirty ones are left to drop, it asks the writer for a trim under the lock
 * and goes on over budget (by the tables loaded meanwhile) until that has run.
 *
 * API: `get(offset)`, `getForWrite(offset)`, `peek(offset)`, `cached(offset)`, `put(offset, data, dirty)`,
 * `changed(table)`, `markDirty(offset)`, `flush()`, `drop(offset)`, `clear()`. Concurrent `get`s
 * of one table share one load.
 *
 * A table keeps its CachedTable object while it is cached: `changed` marks that object dirty, so a
 * change made while its write-back runs leaves it dirty (see writeBack). The hot paths (`changed`
 * of a cached table, a `get` hit) neither suspend nor allocate: every allocating guest write
 * passes here.
 */

export interface TableCacheOptions {
  tableBytes: number;
  budgetBytes: number;
  load(offset: number, into: Uint8Array): Promise<void>;
  writeBack?(offset: number, data: Uint8Array): Promise<void>;
  /** What must be on disk before any dirty table is written back (see above). */
  dependsOn?(): Promise<void>;
  /**
   * Run `job` later with the writer's lock held (see above); its failure is the job's own (a table
   * whose write-back failed stays dirty, and the next flush reports it).
   */
  scheduleWriteBack?(job: () => Promise<void>): void;
}

export interface CachedTable {
  readonly offset: number;
  readonly data: Uint8Array;
  dirty: boolean;
}

export class TableCache {
  private readonly lru: Lru<number, CachedTable>;
  /** Tables whose write-back is under way (not evictable until it is done), with that write. */
  private readonly writing = new Map<CachedTable, Promise<void>>();

  private dependency: (() => Promise<void>) | undefined;
  private scheduleWriteBack: ((job: () => Promise<void>) => void) | undefined;
  /** A trim asked for by a reader and not run yet (one at a time is enough). */
  private trimScheduled = false;

  constructor(private readonly options: TableCacheOptions) {
    this.dependency = options.dependsOn;
    this.scheduleWriteBack = options.scheduleWriteBack;
    // Always keep a few tables, or a read that spans two tables would thrash.
    const maxTables = Math.max(4, Math.floor(options.budgetBytes / options.tableBytes));
    this.lru = new Lru<number, CachedTable>({
      budget: maxTables,
      canEvict: (_, t) => !t.dirty && !this.writing.has(t),
      beforeEvict: (_, t) => this.writeBack(t),
    });
  }

  get size(): number {
    return this.lru.size;
  }

  /**
   * The table if it is cached (marked recently used), else undefined: lets hot paths stay
   * synchronous when the table is there, instead of a promise per lookup.
   */
  peek(offset: number): CachedTable | undefined {
    return this.lru.get(offset);
  }

  /**
   * The table, loaded on a miss: for readers, who run beside the writer (outside its lock). Never
   * writes a table back: a load that brings the cache over budget drops clean tables only, and
   * leaves dirty ones to a trim under the writer's lock (see above).
   */
  async get(offset: number): Promise<CachedTable> {
    const hit = this.lru.get(offset);
    if (hit) return hit;
    const t = await this.load(offset);
    if (this.overBudget) {
      this.lru.trim(offset);
      if (this.overBudget) this.askForTrim();
    }
    return t;
  }

  /**
   * The table, loaded on a miss, for the writer with its lock held: a load that brings the cache
   * over budget writes back and drops the least recently used tables before this returns.
   */
  async getForWrite(offset: number): Promise<CachedTable> {
    const hit = this.lru.get(offset);
    if (hit) return hit;
    const t = await this.load(offset);
    if (this.overBudget) await this.lru.trimAsync(offset);
    return t;
  }

  private load(offset: number): Promise<CachedTable> {
    return this.lru.load(offset, async () => {
      const data = new Uint8Array(this.options.tableBytes);
      await this.options.load(offset, data);
      return { offset, data, dirty: false };
    });
  }

  /** Have the writer trim the cache under its lock (dirty tables only leave through a write-back). */
  private askForTrim(): void {
    const schedule = this.scheduleWriteBack;
    if (!schedule || this.trimScheduled) return;
    this.trimScheduled = true;
    schedule(() => {
      this.trimScheduled = false;
      return this.overBudget ? this.lru.trimAsync() : Promise.resolve();
    });
  }

  /** The table if it is cached, its recency untouched (a whole-table read overlaying its slices). */
  cached(offset: number): CachedTable | undefined {
    return this.lru.peek(offset);
  }

  /** Add a table the caller made (a newly allocated one). */
  async put(offset: number, data: Uint8Array, dirty: boolean): Promise<CachedTable> {
    const t: CachedTable = { offset, data, dirty };
    this.lru.set(offset, t);
    if (this.overBudget) await this.lru.trimAsync(offset);
    return t;
  }

  /**
   * The caller changed `t`'s entries: mark it dirty and most recently used. Undefined (nothing to
   * wait for) when `t` is the cached table, the usual case: re-inserting it cannot exceed the
   * budget. A table no longer cached (evicted or dropped meanwhile) is put back, and the promise
   * is that of the trim its insertion may need.
   */
  changed(t: CachedTable): Promise<unknown> | undefined {
    if (this.lru.peek(t.offset) !== t) return this.put(t.offset, t.data, true);
    t.dirty = true;
    this.lru.get(t.offset);
    return undefined;
  }

  /** More tables held than the budget allows (an insertion then trims, writing back as needed). */
  private get overBudget(): boolean {
    return this.lru.held > this.lru.budget;
  }

  markDirty(offset: number): void {
    const t = this.lru.peek(offset);
    if (!t) throw new Error(`table at 0x${offset.toString(16)} is not cached`);
    t.dirty = true;
  }

  /**
   * State (or replace) what must reach the disk before any table is written back, and how a trim
   * is run under the writer's lock (see above).
   */
  setDependency(dependsOn: () => Promise<void>, scheduleWriteBack?: (job: () => Promise<void>) => void): void {
    this.dependency = dependsOn;
    this.scheduleWriteBack = scheduleWriteBack;
  }

  private writeBack(t: CachedTable): Promise<void> {
    if (!this.options.writeBack) return Promise.reject(new Error('table cache has dirty tables but no write-back hook'));
    const writeBack = this.options.writeBack;
    const before = this.writing.get(t)?.catch(() => undefined); // one write of a table at a time
    const run = (async () => {
      await before;
      if (this.dependency) await this.dependency();
      // Clean from here: a change made while the write runs marks it dirty again, and stays.
      t.dirty = false;
      try {
        await writeBack(t.offset, t.data);
      } catch (e) {
        t.dirty = true;
        throw e;
      }
    })();
    const tracked = run.finally(() => {
      if (this.writing.get(t) === tracked) this.writing.delete(t);
    });
    this.writing.set(t, tracked);
    return tracked;
  }

  /** Whether a table waits to be written back. */
  get hasDirty(): boolean {
    for (const t of this.lru.values()) if (t.dirty) return true;
    return false;
  }

  /** Write every dirty table back, and wait for writes already under way (eviction's) to land. */
  async flush(): Promise<void> {
    for (const t of [...this.lru.values()]) if (t.dirty) await this.writeBack(t);
    for (const p of [...this.writing.values()]) await p;
  }

  /** Forget a table (freed or rewritten elsewhere); a dirty one is dropped unwritten. */
  drop(offset: number): void {
    this.lru.delete(offset);
  }

  clear(): void {
    this.lru.clear();
  }
}
