/**
 * A read-only byte store over HTTP range requests, for opening images that live on a web server
 * (from Node or a browser) and reading only the parts a caller touches.
 *
 * Two layers: `HttpRangeStore` (http-range.ts) sends the requests (one ranged GET per read, with
 * retries, the whole-body fallback for servers that ignore Range, and checks that the image does
 * not change underneath), and a `CachingStore` (caching-store.ts) in front decides what each
 * request fetches and keeps the replies in a bounded cache. The cache's unit is a sixteenth of a
 * chunk: the first read into a chunk fetches only the pieces it needs (a metadata scan that jumps
 * from table to table across a large image then costs kilobytes, not megabytes per table), a
 * second read into the same chunk, or a read that continues the previous one, fetches the rest
 * of the chunk in one request (a guest booting or a convert streaming through data gets whole
 * chunks, as round trips cost far more than bytes). Readers of a piece already in flight share
 * its request. The first request (the probe) fetches chunk 0, which every format reads first; it
 * goes into the cache as read.
 */
import { QcowError } from '../core/errors.js';
import { CachingStore } from './caching-store.js';
import { DEFAULT_MAX_WHOLE_BODY_BYTES, HttpRangeStore, type HttpRangeOptions, type HttpStats } from './http-range.js';
import type { ByteStore, StoreOpener } from './types.js';
import { isHttpUrl, resolveUrl } from './url.js';

export { isHttpUrl, resolveUrl, DEFAULT_MAX_WHOLE_BODY_BYTES, type HttpRangeOptions, type HttpStats };

/** Options of {@link HttpStore.open}, {@link httpOpener} and {@link withHttp}: requests, caching and retries. */
export interface HttpStoreOptions extends HttpRangeOptions {
  /**
   * The most bytes one request fetches: a first read into an aligned chunk fetches a sixteenth
   * of it, a second read (or a read continuing the last) the rest. Default 4 MiB (see below).
   */
  chunkSize?: number;
  /** Most bytes of chunks kept in memory. Default 64 MiB. */
  cacheBytes?: number;
}

// In-browser emulators reported one boot going from 7 minutes to 1 with 4 MiB requests instead of
// small ones: over HTTP, round trips cost far more than bytes.
/** Default bytes per HTTP request (4 MiB): {@link HttpStoreOptions.chunkSize}. */
export const DEFAULT_CHUNK_SIZE = 4 * 2 ** 20;
/** Default bytes of fetched chunks kept in memory (64 MiB): {@link HttpStoreOptions.cacheBytes}. */
export const DEFAULT_CACHE_BYTES = 64 * 2 ** 20;

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
  readonly stats: HttpStats;
  private readonly source: HttpRangeStore;
  private readonly cache: CachingStore;

  private constructor(url: string, options: HttpStoreOptions) {
    this.name = url;
    this.chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!Number.isSafeInteger(this.chunkSize) || this.chunkSize < 512) {
      throw new QcowError('QCOW_INVALID_ARGUMENT', `chunkSize must be an integer of at least 512, not ${options.chunkSize}`);
    }
    this.source = new HttpRangeStore(url, options);
    this.stats = this.source.stats;
    // Blocks of a sixteenth of a chunk (CachingStore's default); never less than one chunk held.
    this.cache = new CachingStore(this.source, { chunkSize: this.chunkSize, cacheBytes: Math.max(options.cacheBytes ?? DEFAULT_CACHE_BYTES, this.chunkSize) });
    // From a server that stopped honouring Range, every read is served from the one body: the
    // cached copies of its pieces are then only memory.
    this.source.onWholeBody = () => this.cache.invalidate();
  }

  /** Open `url`: one ranged request learns the size and range support (and fetches chunk 0). */
  static async open(url: string, options: HttpStoreOptions = {}): Promise<HttpStore> {
    if (!isHttpUrl(url)) throw new QcowError('QCOW_INVALID_ARGUMENT', 'not an http(s) URL', { file: url });
    const store = new HttpStore(url, options);
    const first = await store.source.probe(store.chunkSize);
    if (first && first.length > 0) await store.cache.prime(0, first);
    return store;
  }

  /** Bytes of chunks currently cached (plus the whole body, for a server that ignores Range). */
  get cachedBytes(): number {
    return this.cache.cachedBytes + this.source.wholeBytes;
  }

  /** True when the server honours Range; false when it sent the whole resource instead. */
  get rangeRequests(): boolean {
    return this.source.rangeRequests;
  }

  async size(): Promise<number> {
    return this.source.size();
  }

  async read(offset: number, into: Uint8Array): Promise<number> {
    // Cached pieces are not served once the store is closed or its signal has fired.
    this.source.checkOpen();
    return this.source.rangeRequests ? this.cache.read(offset, into) : this.source.read(offset, into);
  }

  /** Always fails with QCOW_READ_ONLY. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    return this.source.write(offset, data);
  }

  /** Always fails with QCOW_READ_ONLY. */
  async truncate(size: number): Promise<void> {
    return this.source.truncate(size);
  }

  async flush(): Promise<void> {}

  /** Abort requests in flight and drop the cache; later reads fail. */
  async close(): Promise<void> {
    await this.cache.close(); // closes the source too
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
