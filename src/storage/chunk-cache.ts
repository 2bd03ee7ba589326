/**
 * A bounded least-recently-used cache of fixed-size chunks of a remote resource, which also
 * merges concurrent loads: while chunk N is being fetched, every other reader of chunk N waits on
 * the same promise instead of starting a second request.
 */
export class ChunkCache {
  /** Most recently used last (a Map iterates in insertion order). */
  private readonly chunks = new Map<number, Uint8Array>();
  private readonly loading = new Map<number, Promise<Uint8Array>>();
  private bytes = 0;

  /** `budget` is the most bytes held at once; a single chunk larger than it is served but not kept. */
  constructor(readonly budget: number) {}

  get heldBytes(): number {
    return this.bytes;
  }

  has(index: number): boolean {
    return this.chunks.has(index);
  }

  /** The chunk if it is held (then the most recently used), else undefined. */
  take(index: number): Uint8Array | undefined {
    const hit = this.chunks.get(index);
    if (hit) {
      this.chunks.delete(index);
      this.chunks.set(index, hit);
    }
    return hit;
  }

  /** The chunk, from the cache or from `load` (shared with any load of the same chunk already under way). */
  get(index: number, load: (index: number) => Promise<Uint8Array>): Promise<Uint8Array> {
    const hit = this.chunks.get(index);
    if (hit) {
      this.chunks.delete(index);
      this.chunks.set(index, hit);
      return Promise.resolve(hit);
    }
    let pending = this.loading.get(index);
    if (!pending) {
      pending = load(index).then(
        (chunk) => {
          this.loading.delete(index);
          this.put(index, chunk);
          return chunk;
        },
        (e: unknown) => {
          // A failed load is forgotten, so the next reader tries again.
          this.loading.delete(index);
          throw e;
        },
      );
      this.loading.set(index, pending);
    }
    return pending;
  }

  /** Keep `chunk` (e.g. one that arrived with a probe request), evicting the least recently used. */
  put(index: number, chunk: Uint8Array): void {
    const old = this.chunks.get(index);
    if (old) {
      this.chunks.delete(index);
      this.bytes -= old.length;
    }
    if (chunk.length > this.budget) return;
    this.chunks.set(index, chunk);
    this.bytes += chunk.length;
    for (const [i, c] of this.chunks) {
      if (this.bytes <= this.budget) break;
      this.chunks.delete(i);
      this.bytes -= c.length;
    }
  }

  clear(): void {
    this.chunks.clear();
    this.bytes = 0;
  }
}
