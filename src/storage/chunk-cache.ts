import { Lru } from '../core/lru.js';

/**
 * A bounded least-recently-used cache of fixed-size chunks of a remote resource, which also
 * merges concurrent loads: while chunk N is being fetched, every other reader of chunk N waits on
 * the same promise instead of starting a second request. The mechanism is core/lru.ts; the policy
 * here is the byte budget, and that a chunk larger than the whole budget is served but not kept.
 */
export class ChunkCache {
  private readonly lru: Lru<number, Uint8Array>;

  /** `budget` is the most bytes held at once; a single chunk larger than it is served but not kept. */
  constructor(readonly budget: number) {
    this.lru = new Lru({ budget, size: (chunk) => chunk.length });
  }

  get heldBytes(): number {
    return this.lru.held;
  }

  has(index: number): boolean {
    return this.lru.has(index);
  }

  /** The chunk if it is held (then the most recently used), else undefined. */
  take(index: number): Uint8Array | undefined {
    return this.lru.get(index);
  }

  /**
   * The chunk, from the cache or from `load` (shared with any load of the same chunk already under
   * way). A chunk `put` while the load was under way wins over the loaded one.
   */
  get(index: number, load: (index: number) => Promise<Uint8Array>): Promise<Uint8Array> {
    return this.lru.load(index, async (i) => {
      const chunk = await load(i);
      // Too big to keep: served, and the cache is left as it was.
      if (chunk.length > this.budget) throw new Oversized(chunk);
      return chunk;
    }).catch((e: unknown) => {
      if (e instanceof Oversized) return e.chunk;
      throw e;
    });
  }

  /** Keep `chunk` (e.g. one that arrived with a probe request), evicting the least recently used. */
  put(index: number, chunk: Uint8Array): void {
    if (chunk.length > this.budget) {
      this.lru.delete(index);
      return;
    }
    this.lru.set(index, chunk);
  }

  clear(): void {
    this.lru.clear();
  }
}

/** Carries a chunk too big for the cache past the LRU's store step (not an error to readers). */
class Oversized extends Error {
  constructor(readonly chunk: Uint8Array) {
    super('chunk larger than the cache budget');
  }
}
