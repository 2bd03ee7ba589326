/**
 * A read-only byte store over HTTP range requests, for opening images that live on a web server
 * (from Node or a browser) and reading only the parts a caller touches.
 *
 * Reads are served from aligned pieces (a sixteenth of a chunk) kept in a bounded LRU cache;
 * readers of a piece already in flight share its request. What one request fetches adapts to how
 * the image is read: the first read into a chunk fetches only the pieces it needs (a metadata scan
 * that jumps from table to table across a large image then costs kilobytes, not megabytes per
 * table), a second read into the same chunk, or a read that continues the previous one, fetches
 * the rest of the chunk in one request (a guest booting or a convert streaming through data gets
 * whole chunks, as round trips cost far more than bytes). The first request is a ranged GET of
 * chunk 0, which tells the size (Content-Range) and whether the server honours ranges, and holds
 * the image header every format reads first. A server that ignores Range and answers 200 with the
 * whole body is served from that body, when it fits in `maxWholeBodyBytes`.
 */
import { QcowError } from '../core/errors.js';
import { ChunkCache } from './chunk-cache.js';
import {
  abortedError,
  discardBody,
  fetchOnce,
  parseContentRange,
  readBodyCapped,
  statusError,
  TransientHttpError,
  withRetries,
  type RetryPolicy,
} from './http-request.js';
import type { ByteStore, StoreOpener } from './types.js';
import { isHttpUrl, resolveUrl } from './url.js';

export { isHttpUrl, resolveUrl };

/** Options of {@link HttpStore.open}, {@link httpOpener} and {@link withHttp}: requests, caching and retries. */
export interface HttpStoreOptions {
  /**
   * The most bytes one request fetches: a first read into an aligned chunk fetches a sixteenth
   * of it, a second read (or a read continuing the last) the rest. Default 4 MiB (see below).
   */
  chunkSize?: number;
  /** Most bytes of chunks kept in memory. Default 64 MiB. */
  cacheBytes?: number;
  /** Times a transient failure (network, 5xx, 408, 429) is retried. Default 4. */
  retries?: number;
  /** First retry delay in ms, doubling each time up to maxRetryDelayMs. Default 250. */
  retryDelayMs?: number;
  /** Longest retry delay in ms. Default 10000. */
  maxRetryDelayMs?: number;
  /** Largest whole body held from a server that ignores Range. Default 256 MiB. */
  maxWholeBodyBytes?: number;
  /** Extra request headers (e.g. Authorization). */
  headers?: Record<string, string>;
  /** Browsers: whether to send cookies cross-origin. */
  credentials?: RequestCredentials;
  /** Stops every request of this store; reads then fail with QCOW_ABORTED. */
  signal?: AbortSignal;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
}

// In-browser emulators reported one boot going from 7 minutes to 1 with 4 MiB requests instead of
// small ones: over HTTP, round trips cost far more than bytes.
/** Default bytes per HTTP request (4 MiB): {@link HttpStoreOptions.chunkSize}. */
export const DEFAULT_CHUNK_SIZE = 4 * 2 ** 20;
/** Default bytes of fetched chunks kept in memory (64 MiB): {@link HttpStoreOptions.cacheBytes}. */
export const DEFAULT_CACHE_BYTES = 64 * 2 ** 20;
export const DEFAULT_MAX_WHOLE_BODY_BYTES = 256 * 2 ** 20;

/** What the store has cost so far. */
export interface HttpStats {
  /** HTTP requests sent (retries included). */
  requests: number;
  /** Body bytes received. */
  bytesFetched: number;
  /** Requests repeated after a transient failure. */
  retries: number;
}

/**
 * A read-only {@link ByteStore} over HTTP(S) range requests: an image on a web server is opened
 * and only the parts read are fetched, in large chunks kept in a bounded cache. Put an
 * {@link OverlayDevice} over an image from one to write to it.
 *
 * @example
 * ```ts
 * import { HttpStore } from 'qcow/node'; // or qcow/browser
 *
 * const store = await HttpStore.open('https://example.com/disk.qcow2', { chunkSize: 1 << 20 });
 * console.log(await store.size(), store.stats.requests);
 * await store.close();
 * ```
 */
export class HttpStore implements ByteStore {
  /** The URL as opened. */
  readonly name: string;
  /** Always true: HTTP images are read-only. */
  readonly readOnly = true;
  /** Bytes per request, as given in the options or {@link DEFAULT_CHUNK_SIZE}. */
  readonly chunkSize: number;
  /** What the store has cost so far (requests, bytes, retries); updated as it reads. */
  readonly stats: HttpStats = { requests: 0, bytesFetched: 0, retries: 0 };
  private readonly cache: ChunkCache;
  /** The cache's unit and the least one request fetches: a sixteenth of a chunk (the chunk itself when that is not a multiple of 512). */
  private readonly pieceSize: number;
  /** Requests under way, by each piece they bring. */
  private readonly loading = new Map<number, Promise<Map<number, Uint8Array>>>();
  private readonly touched = new Set<number>();
  private lastReadEnd = -1;
  private readonly policy: RetryPolicy;
  private readonly options: HttpStoreOptions;
  private readonly fetchFn: typeof fetch;
  /** Aborted by the caller's signal or by close(); every request listens to it. */
  private readonly stop = new AbortController();
  private length = 0;
  /** The whole resource, when the server sent it all (it ignored Range). */
  private whole: Uint8Array | undefined;
  /** ETag or Last-Modified of the first reply: later replies must match, or the image changed under us. */
  private validator: string | undefined;

  private constructor(url: string, options: HttpStoreOptions) {
    this.name = url;
    this.options = options;
    this.chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!Number.isSafeInteger(this.chunkSize) || this.chunkSize < 512) {
      throw new QcowError('QCOW_INVALID_ARGUMENT', `chunkSize must be an integer of at least 512, not ${options.chunkSize}`);
    }
    this.cache = new ChunkCache(Math.max(options.cacheBytes ?? DEFAULT_CACHE_BYTES, this.chunkSize));
    this.pieceSize = this.chunkSize % (16 * 512) === 0 ? this.chunkSize / 16 : this.chunkSize;
    this.policy = { retries: options.retries ?? 4, baseDelayMs: options.retryDelayMs ?? 250, maxDelayMs: options.maxRetryDelayMs ?? 10_000 };
    this.fetchFn = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    const signal = options.signal;
    if (signal) {
      if (signal.aborted) this.stop.abort(signal.reason);
      else signal.addEventListener('abort', () => this.stop.abort(signal.reason), { once: true });
    }
  }

  /** Open `url`: one ranged request learns the size and range support (and fetches chunk 0). */
  static async open(url: string, options: HttpStoreOptions = {}): Promise<HttpStore> {
    if (!isHttpUrl(url)) throw new QcowError('QCOW_INVALID_ARGUMENT', 'not an http(s) URL', { file: url });
    const store = new HttpStore(url, options);
    await store.probe();
    return store;
  }

  /** Bytes of chunks currently cached (plus the whole body, for a server that ignores Range). */
  get cachedBytes(): number {
    return this.cache.heldBytes + (this.whole?.length ?? 0);
  }

  /** True when the server honours Range; false when it sent the whole resource instead. */
  get rangeRequests(): boolean {
    return this.whole === undefined;
  }

  async size(): Promise<number> {
    this.checkOpen();
    return this.length;
  }

  async read(offset: number, into: Uint8Array): Promise<number> {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || offset < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid offset ${offset}`, { file: this.name });
    const n = Math.max(0, Math.min(into.length, this.length - offset));
    if (n > 0) {
      if (this.whole) into.set(this.whole.subarray(offset, offset + n));
      else await this.readChunks(offset, into.subarray(0, n));
    }
    into.fill(0, n);
    return n;
  }

  /** Always fails with QCOW_READ_ONLY. */
  async write(_offset: number, _data: Uint8Array): Promise<void> {
    throw this.readOnlyError();
  }

  async truncate(_size: number): Promise<void> {
    throw this.readOnlyError();
  }

  async flush(): Promise<void> {}

  /** Abort requests in flight and drop the cache; later reads fail. */
  async close(): Promise<void> {
    if (!this.stop.signal.aborted) this.stop.abort(new QcowError('QCOW_IO', 'the store is closed', { file: this.name }));
    this.cache.clear();
    this.whole = undefined;
  }

  private async readChunks(offset: number, into: Uint8Array): Promise<void> {
    const g = this.pieceSize;
    const end = offset + into.length;
    const first = Math.floor(offset / g);
    const last = Math.floor((end - 1) / g);
    // A read that continues the previous one is a stream: it gets whole chunks at once.
    const continues = offset === this.lastReadEnd;
    this.lastReadEnd = end;
    const wanted: Promise<Uint8Array>[] = [];
    for (let i = first; i <= last; i++) wanted.push(this.piece(i, last, continues));
    const pieces = await Promise.all(wanted);
    for (let i = first; i <= last; i++) {
      const piece = pieces[i - first]!;
      const pieceStart = i * g;
      const from = Math.max(offset, pieceStart);
      const to = Math.min(end, pieceStart + piece.length);
      into.set(piece.subarray(from - pieceStart, to - pieceStart), from - offset);
    }
  }

  /** Piece `i`, from the cache, from a request already under way, or from a new one (see above). */
  private async piece(i: number, lastWanted: number, continues: boolean): Promise<Uint8Array> {
    for (;;) {
      if (this.whole) {
        const start = i * this.pieceSize;
        return this.whole.subarray(start, Math.min(start + this.pieceSize, this.length));
      }
      const hit = this.cache.take(i);
      if (hit) return hit;
      const pending = this.loading.get(i);
      if (pending) {
        const got = (await pending).get(i);
        if (got) return got;
        continue; // that request ended without it (or it was evicted at once): ask again
      }
      const perChunk = this.chunkSize / this.pieceSize;
      const chunk = Math.floor(i / perChunk);
      const dense = continues || this.touched.has(chunk);
      this.touch(chunk);
      // Dense: the whole chunk around i; else from i to the end of what this read wants (within
      // the chunk). Either way one contiguous run, stopping at pieces held or on their way.
      const free = (k: number) => k >= 0 && k < this.pieceCount && !this.cache.has(k) && !this.loading.has(k);
      const stop = dense ? (chunk + 1) * perChunk - 1 : Math.min(lastWanted, (chunk + 1) * perChunk - 1);
      let from = i;
      while (dense && from > chunk * perChunk && free(from - 1)) from--;
      let to = i + 1;
      while (to <= stop && free(to)) to++;
      const run = this.fetchPieces(from, to - from).finally(() => {
        for (let k = from; k < to; k++) this.loading.delete(k);
      });
      for (let k = from; k < to; k++) this.loading.set(k, run);
    }
  }

  /** Chunks read from lately, most recent last (a few hundred: enough to tell a second visit). */
  private touch(chunk: number): void {
    this.touched.delete(chunk);
    this.touched.add(chunk);
    if (this.touched.size > 512) this.touched.delete(this.touched.values().next().value!);
  }

  private get pieceCount(): number {
    return Math.ceil(this.length / this.pieceSize);
  }

  /** Pieces [first, first + count) in one request, each kept in the cache. */
  private async fetchPieces(first: number, count: number): Promise<Map<number, Uint8Array>> {
    const g = this.pieceSize;
    const start = first * g;
    const bytes = await this.fetchRange(start, Math.min(start + count * g, this.length) - 1);
    const out = new Map<number, Uint8Array>();
    if (this.whole) return out; // the server sent everything instead: piece() serves from it
    for (let k = 0; k < count; k++) {
      // Copied out of a larger reply: a cached piece must not keep the whole reply alive.
      const piece = count === 1 ? bytes : bytes.slice(k * g, Math.min((k + 1) * g, bytes.length));
      if (piece.length === 0) break;
      out.set(first + k, piece);
      this.cache.put(first + k, piece);
    }
    return out;
  }

  /** Chunk 0 by a ranged GET, learning the size and whether ranges work. */
  private async probe(): Promise<void> {
    const chunk = await this.request(async () => {
      const res = await this.get(0, this.chunkSize - 1);
      if (res.status === 206) {
        const range = parseContentRange(res.headers.get('content-range'));
        if (!range || range.start !== 0) {
          discardBody(res);
          throw new QcowError('QCOW_IO', `bad Content-Range in reply to a range request: ${res.headers.get('content-range')}`, { file: this.name });
        }
        const total = range.total ?? (await this.sizeByHead());
        this.remember(res);
        const body = await this.body(res, this.chunkSize);
        if (body.length !== range.end + 1) throw new TransientHttpError(`short reply: ${body.length} of ${range.end + 1} bytes`);
        this.length = total;
        return body;
      }
      if (res.status === 416) {
        // Only an empty resource refuses a range starting at 0.
        const range = parseContentRange(res.headers.get('content-range'));
        discardBody(res);
        if (range?.total === 0 || range === undefined) {
          this.length = 0;
          return new Uint8Array(0);
        }
        throw statusError(res, this.name);
      }
      if (res.status === 200) {
        this.remember(res);
        this.whole = await this.wholeBody(res);
        this.length = this.whole.length;
        return undefined;
      }
      discardBody(res);
      throw statusError(res, this.name);
    });
    if (chunk && chunk.length > 0) {
      for (let k = 0; k * this.pieceSize < chunk.length; k++) this.cache.put(k, chunk.slice(k * this.pieceSize, (k + 1) * this.pieceSize));
      this.touch(0);
    }
  }

  /** Bytes [start, end] (inclusive) in one ranged request. */
  private async fetchRange(start: number, end: number): Promise<Uint8Array> {
    return this.request(async () => {
      const res = await this.get(start, end);
      if (res.status === 206) {
        const range = parseContentRange(res.headers.get('content-range'));
        if (!range || range.start !== start || range.end !== end) {
          discardBody(res);
          throw new QcowError('QCOW_IO', `asked for bytes ${start}-${end}, got ${res.headers.get('content-range')}`, { file: this.name });
        }
        this.checkUnchanged(res, range.total);
        const body = await this.body(res, end - start + 1);
        if (body.length !== end - start + 1) throw new TransientHttpError(`short reply: ${body.length} of ${end - start + 1} bytes`);
        return body;
      }
      if (res.status === 200) {
        this.checkUnchanged(res, undefined);
        const whole = await this.wholeBody(res);
        if (whole.length !== this.length) throw this.changedError();
        this.whole = whole;
        this.cache.clear();
        return whole.subarray(start, end + 1);
      }
      discardBody(res);
      throw statusError(res, this.name);
    });
  }

  private get(start: number, end: number): Promise<Response> {
    this.stats.requests++;
    return fetchOnce(this.fetchFn, this.name, {
      headers: { ...this.options.headers, Range: `bytes=${start}-${end}` },
      credentials: this.options.credentials,
      signal: this.stop.signal,
    });
  }

  private async sizeByHead(): Promise<number> {
    this.stats.requests++;
    const res = await fetchOnce(this.fetchFn, this.name, {
      method: 'HEAD',
      headers: this.options.headers,
      credentials: this.options.credentials,
      signal: this.stop.signal,
    });
    const length = Number(res.headers.get('content-length') ?? NaN);
    if (!res.ok || !Number.isSafeInteger(length) || res.headers.get('content-encoding')) {
      throw new QcowError('QCOW_UNSUPPORTED', 'the server tells neither Content-Range totals nor a Content-Length: the image size is unknown', { file: this.name });
    }
    return length;
  }

  private request<T>(attempt: () => Promise<T>): Promise<T> {
    let tries = 0;
    return withRetries(
      () => {
        if (tries++ > 0) this.stats.retries++;
        return attempt();
      },
      this.policy,
      this.name,
      this.stop.signal,
    );
  }

  private async body(res: Response, expected: number): Promise<Uint8Array> {
    // A few bytes of slack: a server that sends more than asked is caught by the length check.
    const body = await readBodyCapped(res, expected + 1, (n) => new QcowError('QCOW_IO', `reply of ${n} bytes to a ${expected}-byte range request`, { file: this.name }), expected);
    this.stats.bytesFetched += body.length;
    return body;
  }

  private async wholeBody(res: Response): Promise<Uint8Array> {
    const limit = this.options.maxWholeBodyBytes ?? DEFAULT_MAX_WHOLE_BODY_BYTES;
    const body = await readBodyCapped(
      res,
      limit,
      (n) =>
        new QcowError(
          'QCOW_UNSUPPORTED',
          `the server ignores range requests (it sent the whole resource, ${n}+ bytes), which is more than the ${limit} bytes allowed in memory (maxWholeBodyBytes)`,
          { file: this.name },
        ),
    );
    this.stats.bytesFetched += body.length;
    return body;
  }

  private remember(res: Response): void {
    this.validator = res.headers.get('etag') ?? res.headers.get('last-modified') ?? undefined;
  }

  private checkUnchanged(res: Response, total: number | undefined): void {
    const now = res.headers.get('etag') ?? res.headers.get('last-modified') ?? undefined;
    if ((this.validator !== undefined && now !== undefined && now !== this.validator) || (total !== undefined && total !== this.length)) {
      discardBody(res);
      throw this.changedError();
    }
  }

  private changedError(): QcowError {
    return new QcowError('QCOW_IO', 'the resource changed on the server while it was being read', { file: this.name });
  }

  private checkOpen(): void {
    if (this.stop.signal.aborted) throw abortedError(this.stop.signal, this.name);
  }

  private readOnlyError(): QcowError {
    return new QcowError('QCOW_READ_ONLY', 'HTTP images are read-only (put an overlay over the image to write)', { file: this.name });
  }
}

/** Opens images by URL, read-only; names inside them resolve relative to the naming image's URL. */
export function httpOpener(options: HttpStoreOptions = {}): StoreOpener {
  return {
    open: (name, o) => {
      if (!o.readOnly || o.create) return Promise.reject(new QcowError('QCOW_READ_ONLY', 'HTTP images can only be opened read-only (open with -r, or put an overlay over the image)', { file: name }));
      return HttpStore.open(name, options);
    },
    resolve: resolveUrl,
  };
}

/** `local` for plain names, HTTP for http(s) URLs (and for every name an image from a URL gives). */
export function withHttp(local: StoreOpener, options: HttpStoreOptions = {}): StoreOpener {
  const http = httpOpener(options);
  return {
    open: (name, o) => (isHttpUrl(name) ? http : local).open(name, o),
    resolve: (name, relativeTo) => (isHttpUrl(relativeTo) ? resolveUrl(name, relativeTo) : isHttpUrl(name) ? name : local.resolve(name, relativeTo)),
    exists: async (name) => {
      if (!isHttpUrl(name)) return local.exists ? local.exists(name) : true;
      try {
        await (await HttpStore.open(name, options)).close();
        return true;
      } catch (e) {
        if (e instanceof QcowError && e.code === 'QCOW_NOT_FOUND') return false;
        throw e;
      }
    },
    remove: async (name) => {
      if (isHttpUrl(name)) throw new QcowError('QCOW_READ_ONLY', 'remote images are read-only', { file: name });
      await local.remove?.(name);
    },
  };
}
