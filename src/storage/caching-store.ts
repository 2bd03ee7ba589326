/**
 * A read cache in front of any byte store: what HttpStore uses, and what a user wraps around a
 * store of their own where reads are slow and round trips dear (an object store, a blob service).
 *
 * The store is read in aligned blocks held in one bounded least-recently-used cache
 * (core/lru.ts), which also merges concurrent misses: readers of a block already on its way wait
 * on the same read. What one read of the wrapped store fetches adapts to how the store is read,
 * over aligned chunks of `chunkSize` bytes (16 blocks by default): the first miss in a chunk
 * fetches only the blocks the caller wants, so a metadata scan that jumps from table to table
 * across a large image costs kilobytes, not a chunk per table; a second miss in the same chunk,
 * or a read that continues the previous one, fetches the rest of the chunk in one read, so a
 * stream through the data costs one round trip per chunk. Either way one read fetches one
 * contiguous run of blocks, stopping at blocks held or already on their way.
 *
 * Writes go through: the wrapped store is written first, then held blocks are patched (or zeroed,
 * for discards and truncation), and a read of those blocks still under way is not kept (its
 * readers get what it read, as any read racing a write may). Flush, close and the rest pass
 * through. The cache assumes every change to the store comes through it (it keeps the size it
 * learnt once); `invalidate` is for a store changed behind its back.
 */
import { QcowError } from '../core/errors.js';
import { Lru } from '../core/lru.js';
import type { Permissions } from './permissions.js';
import type { ByteStore, DataRun, StoreOpener } from './types.js';

/** Options of {@link CachingStore}: block and chunk sizes, and the memory budget. */
export interface CachingStoreOptions {
  /**
   * The most bytes one read of the wrapped store fetches, and the span over which reads adapt: a
   * first miss in an aligned chunk fetches only the blocks wanted, a second miss there (or a read
   * continuing the last) the rest of the chunk. A multiple of `blockSize`. Default 1 MiB.
   */
  chunkSize?: number;
  /**
   * The cache's unit and the least one read of the wrapped store fetches, aligned. Default: a
   * sixteenth of `chunkSize` when that is a multiple of 512, else `chunkSize` (no adaptation).
   */
  blockSize?: number;
  /** The most bytes of blocks held at once; at least `blockSize`. Default 64 MiB. */
  cacheBytes?: number;
}

/** Default {@link CachingStoreOptions.chunkSize} (1 MiB). */
export const DEFAULT_CACHING_CHUNK_SIZE = 2 ** 20;
/** Default {@link CachingStoreOptions.cacheBytes} (64 MiB). */
export const DEFAULT_CACHING_BYTES = 64 * 2 ** 20;

/** How many chunks are remembered as visited (a few hundred: enough to tell a second visit). */
const TOUCHED_CHUNKS = 512;

/**
 * A {@link ByteStore} that wraps another and keeps what is read from it in a bounded cache of
 * aligned blocks (see {@link CachingStoreOptions}). Concurrent readers of one block share one
 * read; writes, discards and truncation go through to the wrapped store and update the blocks
 * held. Its memory is bounded by `cacheBytes`, whatever the reads (blocks being read for a caller
 * live in that caller's read until it returns).
 *
 * @example
 * ```ts
 * import { CachingStore, qcow2Format, type ByteStore } from 'qcow';
 *
 * declare const blob: ByteStore; // say, a store over an object store's ranged GETs
 * const store = new CachingStore(blob, { chunkSize: 4 << 20, cacheBytes: 128 << 20 });
 * const dev = await qcow2Format.open(store, { readOnly: true });
 * ```
 */
export class CachingStore implements ByteStore {
  /** The wrapped store: change it only through this one (or tell this one with {@link invalidate}). */
  readonly inner: ByteStore;
  /** The wrapped store's name. */
  readonly name: string;
  /** The wrapped store's: writes to a read-only one fail as it fails them. */
  readonly readOnly: boolean;
  /** Bytes one read of the wrapped store fetches at most (see {@link CachingStoreOptions.chunkSize}). */
  readonly chunkSize: number;
  /** The unit kept in the cache (see {@link CachingStoreOptions.blockSize}). */
  readonly blockSize: number;
  /** The most bytes held (see {@link CachingStoreOptions.cacheBytes}). */
  readonly cacheBytes: number;
  /** Passed through, where the wrapped store has it. */
  readonly allocatedSize?: () => Promise<number>;
  /** Passed through, where the wrapped store has it: the cache does not change what is data. */
  readonly dataRuns?: (offset: number, length: number) => Promise<DataRun[]>;
  /** Passed through, where the wrapped store has it; the range then reads as zeros from the cache too. */
  readonly punchHole?: (offset: number, length: number) => Promise<void>;
  /** Passed through, where the wrapped store has it; the range then reads as zeros from the cache too. */
  readonly zeroRange?: (offset: number, length: number) => Promise<void>;
  /** Passed through, where the wrapped store has it. */
  readonly allocate?: (offset: number, length: number) => Promise<void>;
  /**
   * Passed through, where the wrapped store has it; a target that is itself a CachingStore is
   * unwrapped (the wrapped stores copy) and its blocks of the range are updated.
   */
  readonly copyTo?: (target: ByteStore, from: number, to: number, length: number) => Promise<number>;
  /** Passed through, where the wrapped store has it. */
  readonly setPermissions?: (p: Permissions) => void;

  private readonly lru: Lru<number, Uint8Array>;
  private readonly blocksPerChunk: number;
  /** Chunks missed in lately, most recent last: a second miss in one fetches the rest of it. */
  private readonly touched = new Set<number>();
  /** Where the last read ended: a read starting there is a stream. */
  private lastReadEnd = -1;
  /** The store's length, learnt once and then kept up to date by the changes made through here. */
  private length: number | undefined;
  private sizing: Promise<number> | undefined;
  private closed = false;

  /** Wrap `inner`; it is closed when this store is. */
  constructor(inner: ByteStore, options: CachingStoreOptions = {}) {
    this.inner = inner;
    this.name = inner.name;
    this.readOnly = inner.readOnly;
    const chunk = options.chunkSize ?? DEFAULT_CACHING_CHUNK_SIZE;
    if (!Number.isSafeInteger(chunk) || chunk < 1) throw invalid(`chunkSize must be a positive integer, not ${options.chunkSize}`);
    const block = options.blockSize ?? (chunk % (16 * 512) === 0 ? chunk / 16 : chunk);
    if (!Number.isSafeInteger(block) || block < 1 || chunk % block !== 0) throw invalid(`blockSize must be a positive integer dividing chunkSize (${chunk}), not ${options.blockSize}`);
    const budget = options.cacheBytes ?? Math.max(DEFAULT_CACHING_BYTES, chunk);
    // Every block is blockSize bytes, so a budget of at least one block is never exceeded.
    if (!Number.isSafeInteger(budget) || budget < block) throw invalid(`cacheBytes must be an integer of at least blockSize (${block}), not ${options.cacheBytes}`);
    this.chunkSize = chunk;
    this.blockSize = block;
    this.cacheBytes = budget;
    this.blocksPerChunk = chunk / block;
    this.lru = new Lru({ budget, size: (b) => b.length });

    if (inner.allocatedSize) this.allocatedSize = () => inner.allocatedSize!();
    if (inner.dataRuns) this.dataRuns = (offset, length) => inner.dataRuns!(offset, length);
    if (inner.setPermissions) this.setPermissions = (p) => inner.setPermissions!(p);
    if (inner.punchHole) this.punchHole = (offset, length) => this.changing(offset, offset + length, () => inner.punchHole!(offset, length));
    if (inner.zeroRange) this.zeroRange = (offset, length) => this.changing(offset, offset + length, () => inner.zeroRange!(offset, length));
    if (inner.allocate) {
      this.allocate = async (offset, length) => {
        await this.size();
        await inner.allocate!(offset, length);
        this.grew(offset + length); // the content is unchanged: zeros stay zeros
      };
    }
    if (inner.copyTo) this.copyTo = (target, from, to, length) => this.copyOut(inner.copyTo!.bind(inner), target, from, to, length);
  }

  /** Bytes of blocks held now (never more than {@link cacheBytes}). */
  get cachedBytes(): number {
    return this.lru.held;
  }

  async size(): Promise<number> {
    this.checkOpen();
    if (this.length !== undefined) return this.length;
    // Concurrent first callers share one question to the wrapped store.
    this.sizing ??= this.inner.size().then(
      (n) => {
        this.sizing = undefined;
        this.length ??= n;
        return this.length;
      },
      (e: unknown) => {
        this.sizing = undefined;
        throw e;
      },
    );
    return this.sizing;
  }

  async read(offset: number, into: Uint8Array): Promise<number> {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || offset < 0) throw invalid(`invalid offset ${offset}`, this.name);
    const length = this.length ?? (await this.size());
    const n = Math.max(0, Math.min(into.length, length - offset));
    if (n > 0) {
      const misses = this.readBlocks(offset, into.subarray(0, n), length);
      if (misses) await misses;
    }
    into.fill(0, n);
    return n;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.checkOpen();
    await this.changing(offset, offset + data.length, () => this.inner.write(offset, data), data);
    this.grew(offset + data.length);
  }

  async truncate(size: number): Promise<void> {
    this.checkOpen();
    const before = await this.size();
    const [low, high] = [Math.min(before, size), Math.max(before, size)];
    try {
      await this.inner.truncate(size);
    } catch (e) {
      this.update(low, high, undefined, true);
      throw e;
    }
    this.length = size;
    // Blocks wholly past the new end are dropped; the one across it reads zeros from there on.
    this.update(low, high, undefined, false);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  /** Drop the cache and close the wrapped store. */
  async close(): Promise<void> {
    this.closed = true;
    this.lru.clear();
    await this.inner.close();
  }

  /**
   * Keep bytes already read from the wrapped store at `offset` (say, the reply to a probe made
   * before wrapping it) as cached blocks: the whole blocks they cover, and a last partial block
   * when they reach the end of the store. They count as a visit to their chunks.
   */
  async prime(offset: number, bytes: Uint8Array): Promise<void> {
    this.checkOpen();
    const length = await this.size();
    const b = this.blockSize;
    const end = Math.min(offset + bytes.length, length);
    for (let k = Math.ceil(offset / b); k * b < end; k++) {
      const start = k * b;
      if (start + b > end && end < length) break; // a partial block short of the store's end
      const block = new Uint8Array(b);
      block.set(bytes.subarray(start - offset, Math.min(start + b, end) - offset));
      this.lru.set(k, block);
      this.touch(Math.floor(k / this.blocksPerChunk));
    }
  }

  /**
   * Forget the cached bytes of [offset, offset + length), or everything (and the size) without
   * arguments: for a wrapped store changed other than through this one.
   */
  invalidate(offset?: number, length?: number): void {
    if (offset === undefined) {
      this.lru.clear();
      this.length = undefined;
      return;
    }
    this.update(offset, offset + (length ?? Infinity), undefined, true);
  }

  /** Copies the blocks held at once; resolves when the missing ones are in (undefined when none was missing). */
  private readBlocks(offset: number, into: Uint8Array, length: number): Promise<unknown> | undefined {
    const b = this.blockSize;
    const end = offset + into.length;
    const first = Math.floor(offset / b);
    const last = Math.floor((end - 1) / b);
    const continues = offset === this.lastReadEnd;
    this.lastReadEnd = end;
    const copy = (k: number, block: Uint8Array) => {
      const start = k * b;
      const from = Math.max(offset, start);
      into.set(block.subarray(from - start, Math.min(end, start + b) - start), from - offset);
    };
    let waits: Promise<void>[] | undefined;
    for (let k = first; k <= last; k++) {
      const hit = this.lru.get(k);
      if (hit) copy(k, hit);
      else (waits ??= []).push(this.block(k, last, continues, length).then((block) => copy(k, block)));
    }
    return waits && Promise.all(waits);
  }

  /**
   * Block `i`: joins a read of it under way, or reads the run of blocks planned around it (see
   * the top of the file), each block of the run loaded into the cache as one shared load.
   */
  private block(i: number, lastWanted: number, continues: boolean, length: number): Promise<Uint8Array> {
    return this.lru.load(i, () => {
      const [from, to] = this.plan(i, lastWanted, continues, length);
      const run = this.readRun(from, to, length);
      for (let k = from; k < to; k++) {
        // The run's other blocks: nobody may wait on them, so their failure is only the caller's.
        if (k !== i) this.lru.load(k, () => run.then((blocks) => blocks[k - from]!)).catch(() => {});
      }
      return run.then((blocks) => blocks[i - from]!);
    });
  }

  /** The blocks [from, to) one read of the wrapped store fetches for a miss of block `i`. */
  private plan(i: number, lastWanted: number, continues: boolean, length: number): [number, number] {
    const per = this.blocksPerChunk;
    const chunk = Math.floor(i / per);
    const dense = continues || this.touched.has(chunk);
    this.touch(chunk);
    const free = (k: number) => k >= 0 && k * this.blockSize < length && !this.lru.has(k) && !this.lru.isLoading(k);
    const chunkLast = (chunk + 1) * per - 1;
    const stop = dense ? chunkLast : Math.min(lastWanted, chunkLast);
    let from = i;
    while (dense && from > chunk * per && free(from - 1)) from--;
    let to = i + 1;
    while (to <= stop && free(to)) to++;
    return [from, to];
  }

  /** Blocks [from, to) in one read, each blockSize bytes (zeros past the store's end). */
  private async readRun(from: number, to: number, length: number): Promise<Uint8Array[]> {
    const b = this.blockSize;
    const bytes = new Uint8Array((to - from) * b);
    const start = from * b;
    await this.inner.read(start, bytes.subarray(0, Math.min(bytes.length, length - start)));
    if (to - from === 1) return [bytes];
    // Copied apart: a held block must not keep the whole run's buffer alive.
    const blocks: Uint8Array[] = [];
    for (let k = 0; k < to - from; k++) blocks.push(bytes.slice(k * b, (k + 1) * b));
    return blocks;
  }

  private touch(chunk: number): void {
    this.touched.delete(chunk);
    this.touched.add(chunk);
    if (this.touched.size > TOUCHED_CHUNKS) this.touched.delete(this.touched.values().next().value!);
  }

  /**
   * Run `change` on the wrapped store over [start, end), then bring the cache in line: held
   * blocks take `data` (written at `start`) or zeros, reads of them under way are not kept. If
   * the change fails, what it left is unknown: the blocks are dropped.
   */
  private async changing(start: number, end: number, change: () => Promise<void>, data?: Uint8Array): Promise<void> {
    // The size is learnt before the change, so that a size asked meanwhile cannot predate it.
    await this.size();
    try {
      await change();
    } catch (e) {
      this.update(start, end, undefined, true);
      throw e;
    }
    this.update(start, end, data, false);
  }

  /**
   * The wrapped store's copy into `target`; a CachingStore target is unwrapped (its wrapped store
   * is what the copy can reach) and told what changed under it: the bytes copied (the rest of the
   * range is left as it was).
   */
  private async copyOut(copy: NonNullable<ByteStore['copyTo']>, target: ByteStore, from: number, to: number, length: number): Promise<number> {
    if (!(target instanceof CachingStore)) return copy(target, from, to, length);
    await target.size();
    let copied: number;
    try {
      copied = await copy(target.inner, from, to, length);
    } catch (e) {
      target.update(to, to + length, undefined, true);
      throw e;
    }
    target.update(to, to + copied, undefined, true);
    target.grew(to + copied);
    return copied;
  }

  private grew(end: number): void {
    if (this.length !== undefined && end > this.length) this.length = end;
  }

  /** Patch (or with `drop`, forget) held blocks over [start, end); loads of them under way are not kept. */
  private update(start: number, end: number, data: Uint8Array | undefined, drop: boolean): void {
    if (end <= start) return;
    const b = this.blockSize;
    const first = Math.floor(start / b);
    const last = Math.ceil(end / b) - 1;
    // Visit the range's blocks or the cache's, whichever are fewer (a truncation can span terabytes).
    const keys = last - first + 1 <= this.lru.size + this.lru.loadingCount ? range(first, last) : [...this.lru.keys(), ...this.lru.loadingKeys()].filter((k) => k >= first && k <= last);
    for (const k of keys) {
      const block = this.lru.peek(k);
      if (!block) {
        this.lru.delete(k); // a load under way: it read the old bytes
        continue;
      }
      const blockStart = k * b;
      if (drop || (this.length !== undefined && blockStart >= this.length && !data)) {
        this.lru.delete(k);
        continue;
      }
      const from = Math.max(start, blockStart);
      const to = Math.min(end, blockStart + b);
      if (data) block.set(data.subarray(from - start, to - start), from - blockStart);
      else block.fill(0, from - blockStart, to - blockStart);
    }
  }

  private checkOpen(): void {
    if (this.closed) throw new QcowError('QCOW_IO', 'the store is closed', { file: this.name });
  }
}

/**
 * An opener whose stores are those `inner` opens, each wrapped in its own {@link CachingStore}:
 * an image and every backing file it names are read through caches.
 *
 * @example
 * ```ts
 * import { cachingOpener, openImageWith, builtinFormats, type StoreOpener } from 'qcow';
 *
 * declare const bucket: StoreOpener; // opens names in an object store
 * const dev = await openImageWith('disks/top.qcow2', {
 *   readOnly: true,
 *   formats: builtinFormats(),
 *   opener: cachingOpener(bucket, { chunkSize: 4 << 20 }),
 * });
 * ```
 */
export function cachingOpener(inner: StoreOpener, options: CachingStoreOptions = {}): StoreOpener {
  const opener: StoreOpener = {
    open: async (name, o) => new CachingStore(await inner.open(name, o), options),
    resolve: (name, relativeTo) => inner.resolve(name, relativeTo),
  };
  if (inner.exists) opener.exists = (name) => inner.exists!(name);
  if (inner.remove) opener.remove = (name) => inner.remove!(name);
  return opener;
}

function* range(first: number, last: number): Generator<number> {
  for (let k = first; k <= last; k++) yield k;
}

function invalid(message: string, file?: string): QcowError {
  return new QcowError('QCOW_INVALID_ARGUMENT', message, { file });
}
