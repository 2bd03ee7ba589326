/**
 * The uncached half of HttpStore: a read-only byte store where every read is one ranged GET
 * (retried when the failure is transient). HttpStore puts a CachingStore in front of it, which
 * decides what each request fetches.
 *
 * The first request is a ranged GET of the first chunk (`probe`), which tells the size
 * (Content-Range) and whether the server honours ranges, and holds the image header every format
 * reads first. A server that ignores Range and answers 200 with the whole body is served from
 * that body, when it fits in `maxWholeBodyBytes`; so is every later read, if a server starts
 * ignoring Range midway. Every reply must carry the first reply's validator (ETag or
 * Last-Modified) and total: an image that changes on the server while it is read is an error.
 */
import { QcowError } from '../core/errors.js';
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
import type { ByteStore } from './types.js';

/** How an HTTP store makes its requests: retries, limits, headers; the part of `HttpStoreOptions` that is not about caching. */
export interface HttpRangeOptions {
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

export const DEFAULT_MAX_WHOLE_BODY_BYTES = 256 * 2 ** 20;

/** What a store has cost so far. */
export interface HttpStats {
  /** HTTP requests sent (retries included). */
  requests: number;
  /** Body bytes received. */
  bytesFetched: number;
  /** Requests repeated after a transient failure. */
  retries: number;
}

export class HttpRangeStore implements ByteStore {
  readonly readOnly = true;
  readonly stats: HttpStats = { requests: 0, bytesFetched: 0, retries: 0 };
  /** Called once when the server is found to ignore Range: every read is served from `whole` from then on. */
  onWholeBody: (() => void) | undefined;
  private readonly policy: RetryPolicy;
  private readonly fetchFn: typeof fetch;
  /** Aborted by the caller's signal or by close(); every request listens to it. */
  private readonly stop = new AbortController();
  private length = 0;
  /** The whole resource, when the server sent it all (it ignored Range). */
  private whole: Uint8Array | undefined;
  /** ETag or Last-Modified of the first reply: later replies must match, or the image changed under us. */
  private validator: string | undefined;

  constructor(
    readonly name: string,
    private readonly options: HttpRangeOptions,
  ) {
    this.policy = { retries: options.retries ?? 4, baseDelayMs: options.retryDelayMs ?? 250, maxDelayMs: options.maxRetryDelayMs ?? 10_000 };
    this.fetchFn = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    const signal = options.signal;
    if (signal) {
      if (signal.aborted) this.stop.abort(signal.reason);
      else signal.addEventListener('abort', () => this.stop.abort(signal.reason), { once: true });
    }
  }

  /** True when the server honours Range; false when it sent the whole resource instead. */
  get rangeRequests(): boolean {
    return this.whole === undefined;
  }

  /** Bytes of the whole body held (a server that ignores Range), else 0. */
  get wholeBytes(): number {
    return this.whole?.length ?? 0;
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
      const target = into.subarray(0, n);
      if (this.whole) target.set(this.whole.subarray(offset, offset + n));
      else {
        // A range reply is read straight into `target`; only a whole body (a server that stopped
        // honouring Range) comes back apart and is copied.
        const bytes = await this.fetchRange(offset, offset + n - 1, target);
        if (bytes !== target) target.set(bytes);
      }
    }
    into.fill(0, n);
    return n;
  }

  async write(_offset: number, _data: Uint8Array): Promise<void> {
    throw this.readOnlyError();
  }

  async truncate(_size: number): Promise<void> {
    throw this.readOnlyError();
  }

  async flush(): Promise<void> {}

  /** Abort requests in flight; later reads fail. */
  async close(): Promise<void> {
    if (!this.stop.signal.aborted) this.stop.abort(new QcowError('QCOW_IO', 'the store is closed', { file: this.name }));
    this.whole = undefined;
  }

  /** Fails with the reason the store stopped (closed, or the caller's signal) once it has. */
  checkOpen(): void {
    if (this.stop.signal.aborted) throw abortedError(this.stop.signal, this.name);
  }

  /**
   * Bytes [0, firstBytes) by a ranged GET, learning the size and whether ranges work. Resolves
   * with the bytes, or undefined when the server sent the whole resource instead (then held).
   */
  async probe(firstBytes: number): Promise<Uint8Array | undefined> {
    return this.request(async () => {
      const res = await this.get(0, firstBytes - 1);
      if (res.status === 206) {
        const range = parseContentRange(res.headers.get('content-range'));
        if (!range || range.start !== 0) {
          discardBody(res);
          throw new QcowError('QCOW_IO', `bad Content-Range in reply to a range request: ${res.headers.get('content-range')}`, { file: this.name });
        }
        const total = range.total ?? (await this.sizeByHead());
        this.remember(res);
        const body = await this.body(res, firstBytes);
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
  }

  /** Bytes [start, end] (inclusive) in one ranged request, read into `into` (end - start + 1 bytes). */
  private async fetchRange(start: number, end: number, into: Uint8Array): Promise<Uint8Array> {
    return this.request(async () => {
      const res = await this.get(start, end);
      if (res.status === 206) {
        const range = parseContentRange(res.headers.get('content-range'));
        if (!range || range.start !== start || range.end !== end) {
          discardBody(res);
          throw new QcowError('QCOW_IO', `asked for bytes ${start}-${end}, got ${res.headers.get('content-range')}`, { file: this.name });
        }
        this.checkUnchanged(res, range.total);
        const body = await this.body(res, into);
        if (body.length !== end - start + 1) throw new TransientHttpError(`short reply: ${body.length} of ${end - start + 1} bytes`);
        return body;
      }
      if (res.status === 200) {
        this.checkUnchanged(res, undefined);
        const whole = await this.wholeBody(res);
        if (whole.length !== this.length) throw this.changedError();
        this.whole = whole;
        this.onWholeBody?.();
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

  /** A range reply's body: `expected` bytes, or as many as `expected` holds, read into it. */
  private async body(res: Response, expected: number | Uint8Array): Promise<Uint8Array> {
    const length = typeof expected === 'number' ? expected : expected.length;
    // A few bytes of slack: a server that sends more than asked is caught by the length check.
    const body = await readBodyCapped(res, length + 1, (n) => new QcowError('QCOW_IO', `reply of ${n} bytes to a ${length}-byte range request`, { file: this.name }), expected);
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

  private readOnlyError(): QcowError {
    return new QcowError('QCOW_READ_ONLY', 'HTTP images are read-only (put an overlay over the image to write)', { file: this.name });
  }
}
