/**
 * The one least-recently-used cache the library's caches are built on (HTTP pieces, qcow L2
 * tables, qcow2 L2 tables and refcount blocks). Each of those keeps its own policy (byte budget,
 * pinning, write-back order, dependencies) in its own module; the mechanism is here:
 *
 *   - keyed entries, most recently used last (a Map iterates in insertion order);
 *   - a budget, counted in entries or in whatever `size` returns (bytes, say);
 *   - a hit makes the entry the most recently used;
 *   - eviction drops the least recently used entry that `canEvict` allows (a dirty or pinned one
 *     stays);
 *   - concurrent loads of one key are merged: a second reader waits on the same promise;
 *   - a load racing a `set`, `delete` or `clear` of its key is stale: it is not stored (the newer
 *     content, or the absence, stands) and its waiters get the newer value when there is one;
 *   - write-back caches give `beforeEvict`: `trimAsync` then calls it for a dirty (not evictable)
 *     entry, keeping the entry in the cache while it runs (so a reader meanwhile sees the memory
 *     copy, never the disk one being overwritten), and drops it afterwards if it is clean then.
 *
 * With `beforeEvict`, inserting never trims: the owner awaits `trimAsync()` where it suits its
 * write-back order. Without it, every insertion trims synchronously (`trim`).
 */
export interface LruOptions<K, V> {
  /** The most held at once, in units of `size` (entries when `size` is not given). */
  budget: number;
  /** An entry's share of the budget (default 1). */
  size?(value: V, key: K): number;
  /** False keeps an entry however old (dirty, pinned); default true. */
  canEvict?(key: K, value: V): boolean;
  /** Makes a non-evictable entry evictable (writes it back); used by `trimAsync` only. */
  beforeEvict?(key: K, value: V): Promise<void>;
}

interface Loading<V> {
  promise: Promise<V>;
  /** Set when a newer value (or a delete) overtook this load: its result is not stored. */
  stale: boolean;
}

export class Lru<K, V> {
  private readonly map = new Map<K, V>();
  private readonly loading = new Map<K, Loading<V>>();
  /** Entries whose `beforeEvict` is running (not picked again meanwhile). */
  private readonly evicting = new Set<K>();
  private used = 0;
  /**
   * The key last made most recently used (the Map's last), or undefined when not known. Touching
   * it again changes nothing, so get() and a re-insertion skip the Map delete + set: V8 shrinks a
   * Map's table when a delete leaves it a quarter full, so with one or two entries (one L2 table,
   * one refcount block: every allocating write) each touch reallocated it.
   */
  private newest: K | undefined;

  constructor(private readonly options: LruOptions<K, V>) {}

  get budget(): number {
    return this.options.budget;
  }

  /** Entries held. */
  get size(): number {
    return this.map.size;
  }

  /** Budget units held (entries, or the sum of `size`). */
  get held(): number {
    return this.used;
  }

  has(key: K): boolean {
    return this.map.has(key);
  }

  isLoading(key: K): boolean {
    return this.loading.has(key);
  }

  /** Loads under way (not yet stored). */
  get loadingCount(): number {
    return this.loading.size;
  }

  /** The keys of loads under way. */
  loadingKeys(): IterableIterator<K> {
    return this.loading.keys();
  }

  /** The entry, made the most recently used; undefined when not held. */
  get(key: K): V | undefined {
    const hit = this.map.get(key);
    if (hit !== undefined && key !== this.newest) {
      this.map.delete(key);
      this.map.set(key, hit);
      this.newest = key;
    }
    return hit;
  }

  /** The entry without touching its recency. */
  peek(key: K): V | undefined {
    return this.map.get(key);
  }

  /**
   * The entry, from the cache or from `load` (shared with a load of the same key under way). The
   * loaded value is stored unless a `set`/`delete`/`clear` of the key came first (see above). A
   * failed load is forgotten, so the next reader tries again. A freshly loaded entry is never the
   * one its own insertion evicts.
   */
  load(key: K, load: (key: K) => Promise<V>): Promise<V> {
    const hit = this.get(key);
    if (hit !== undefined) return Promise.resolve(hit);
    const pending = this.loading.get(key);
    if (pending) return pending.promise;
    const entry: Loading<V> = { promise: undefined as unknown as Promise<V>, stale: false };
    entry.promise = load(key).then(
      (value) => {
        if (this.loading.get(key) === entry) this.loading.delete(key);
        if (entry.stale) return this.map.get(key) ?? value;
        this.insert(key, value);
        if (!this.options.beforeEvict) this.trim(key);
        return value;
      },
      (e: unknown) => {
        if (this.loading.get(key) === entry) this.loading.delete(key);
        throw e;
      },
    );
    this.loading.set(key, entry);
    return entry.promise;
  }

  /** Store (or replace) an entry as the most recently used; any load of the key under way is stale. */
  set(key: K, value: V): void {
    this.overtake(key);
    this.insert(key, value);
    if (!this.options.beforeEvict) this.trim();
  }

  /** Forget an entry (an in-flight load of it is not stored either); true if it was held. */
  delete(key: K): boolean {
    this.overtake(key);
    return this.remove(key);
  }

  clear(): void {
    for (const l of this.loading.values()) l.stale = true;
    this.loading.clear();
    this.map.clear();
    this.newest = undefined;
    this.used = 0;
  }

  /** Least recently used first. */
  keys(): IterableIterator<K> {
    return this.map.keys();
  }

  values(): IterableIterator<V> {
    return this.map.values();
  }

  entries(): IterableIterator<[K, V]> {
    return this.map.entries();
  }

  /** Drop least recently used evictable entries until within the budget (`keep` stays). */
  trim(keep?: K): void {
    if (this.used <= this.options.budget) return;
    for (const [k, v] of this.map) {
      if (this.used <= this.options.budget) break;
      if (k !== keep && this.evictable(k, v)) this.remove(k);
    }
  }

  /**
   * As `trim`, in strict least-recently-used order, making non-evictable entries evictable with
   * `beforeEvict` first (each kept in the cache until its hook is done). One pass: an entry that
   * is still not evictable after its hook (changed again meanwhile) stays.
   */
  async trimAsync(keep?: K): Promise<void> {
    if (this.used <= this.options.budget) return;
    for (const [k, v] of [...this.map]) {
      if (this.used <= this.options.budget) break;
      if (k === keep || this.map.get(k) !== v || this.evicting.has(k)) continue;
      if (!this.evictable(k, v)) {
        if (!this.options.beforeEvict) continue;
        this.evicting.add(k);
        try {
          await this.options.beforeEvict(k, v);
        } finally {
          this.evicting.delete(k);
        }
        if (this.used <= this.options.budget || this.map.get(k) !== v || !this.evictable(k, v)) continue;
      }
      this.remove(k);
    }
  }

  private evictable(k: K, v: V): boolean {
    return this.options.canEvict ? this.options.canEvict(k, v) : true;
  }

  private sizeOf(k: K, v: V): number {
    return this.options.size ? this.options.size(v, k) : 1;
  }

  private overtake(key: K): void {
    const l = this.loading.get(key);
    if (l) {
      l.stale = true;
      this.loading.delete(key);
    }
  }

  private insert(key: K, value: V): void {
    if (key === this.newest && this.map.has(key)) {
      // Already last: replaced where it stands.
      this.used -= this.sizeOf(key, this.map.get(key) as V);
    } else {
      this.remove(key);
    }
    this.map.set(key, value);
    this.newest = key;
    this.used += this.sizeOf(key, value);
  }

  private remove(key: K): boolean {
    const old = this.map.get(key);
    if (old === undefined && !this.map.has(key)) return false;
    if (key === this.newest) this.newest = undefined;
    this.map.delete(key);
    this.used -= this.sizeOf(key, old as V);
    return true;
  }
}
