/**
 * The HTTP plumbing under HttpStore: one request with bounded retries, Content-Range parsing and
 * body reading with a size cap. Only global `fetch`, so it runs in Node 20 and in browsers.
 */
import { QcowError } from '../core/errors.js';

export interface RetryPolicy {
  /** How many times a transient failure is retried before giving up (so attempts = retries + 1). */
  retries: number;
  /** The first wait; it doubles on every retry, up to maxDelayMs. */
  baseDelayMs: number;
  maxDelayMs: number;
}

/** A failure worth trying again: the network, a 5xx other than 501, 408, 425 or 429. */
export class TransientHttpError extends Error {
  constructor(
    message: string,
    /** What the server asked us to wait (Retry-After), in milliseconds. */
    readonly retryAfterMs?: number,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

const TRANSIENT_STATUSES = new Set([408, 425, 429]);

export function isTransientStatus(status: number): boolean {
  return TRANSIENT_STATUSES.has(status) || (status >= 500 && status !== 501 && status !== 505);
}

/** The error for a reply we cannot use and should not retry. */
export function statusError(res: Response, url: string): QcowError {
  const what = `HTTP ${res.status}${res.statusText ? ' ' + res.statusText : ''}`;
  if (res.status === 404 || res.status === 410) return new QcowError('QCOW_NOT_FOUND', `No such file or directory (${what})`, { file: url });
  return new QcowError('QCOW_IO', what, { file: url });
}

/** Drop a reply's body we will not read, so the connection can be reused. */
export function discardBody(res: Response): void {
  res.body?.cancel().catch(() => undefined);
}

/** Retry-After in milliseconds (seconds or an HTTP date), when present and sensible. */
export function retryAfterMs(res: Response): number | undefined {
  const v = res.headers.get('retry-after');
  if (!v) return undefined;
  const seconds = Number(v);
  if (Number.isFinite(seconds) && seconds >= 0) return seconds * 1000;
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}

/**
 * Run `attempt` until it succeeds, fails for good, or has failed transiently `retries + 1` times.
 * Waits double each time (Retry-After wins when larger, within maxDelayMs). An aborted `signal`
 * ends everything at once with QCOW_ABORTED.
 */
export async function withRetries<T>(attempt: () => Promise<T>, policy: RetryPolicy, url: string, signal: AbortSignal): Promise<T> {
  for (let n = 0; ; n++) {
    try {
      return await attempt();
    } catch (e) {
      if (signal.aborted) throw abortedError(signal, url);
      if (!(e instanceof TransientHttpError)) throw e;
      if (n >= policy.retries) {
        throw new QcowError('QCOW_IO', `${e.message} (gave up after ${n + 1} attempts)`, { file: url, cause: e.cause ?? e });
      }
      const backoff = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** n);
      await sleep(Math.min(policy.maxDelayMs, Math.max(backoff, e.retryAfterMs ?? 0)), signal).catch(() => {
        throw abortedError(signal, url);
      });
    }
  }
}

export function abortedError(signal: AbortSignal, url: string): QcowError {
  const reason: unknown = signal.reason;
  // close() aborts with a QcowError of its own; a caller's signal gives QCOW_ABORTED.
  if (reason instanceof QcowError) return reason;
  return new QcowError('QCOW_ABORTED', 'operation aborted', { file: url, cause: reason });
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

/** fetch, with network failures marked transient. */
export async function fetchOnce(fetchFn: typeof fetch, url: string, init: RequestInit): Promise<Response> {
  let res: Response;
  try {
    res = await fetchFn(url, init);
  } catch (e) {
    if (init.signal?.aborted) throw e;
    // A certificate we do not trust stays untrusted: say so at once instead of retrying it.
    const code = (e as { cause?: { code?: unknown } }).cause?.code;
    if (typeof code === 'string' && TLS_TRUST_CODES.test(code)) {
      throw new QcowError('QCOW_IO', `TLS: the server's certificate is not trusted (${code}); NODE_EXTRA_CA_CERTS can name a CA to trust`, { file: url, cause: e });
    }
    throw new TransientHttpError(`network error: ${(e as Error).message ?? e}${causeText(e)}`, undefined, { cause: e });
  }
  if (isTransientStatus(res.status)) {
    discardBody(res);
    throw new TransientHttpError(`HTTP ${res.status}${res.statusText ? ' ' + res.statusText : ''}`, retryAfterMs(res));
  }
  return res;
}

/** OpenSSL's and Node's codes for a certificate that cannot be verified (never transient). */
const TLS_TRUST_CODES = /^(ERR_TLS_CERT_ALTNAME_INVALID|CERT_|UNABLE_TO_|SELF_SIGNED_CERT|DEPTH_ZERO_SELF_SIGNED_CERT|CERT_HAS_EXPIRED|HOSTNAME_MISMATCH)/;

function causeText(e: unknown): string {
  const cause = (e as { cause?: { code?: string; message?: string } }).cause;
  return cause ? ` (${cause.code ?? cause.message ?? String(cause)})` : '';
}

export interface ContentRange {
  start: number;
  /** Inclusive, as written on the wire. */
  end: number;
  /** The whole resource's length; undefined when the server wrote `*`. */
  total: number | undefined;
}

/** `bytes 0-499/1234`, `bytes 0-499/*` or (for 416) `bytes *\/1234` (start = end = -1). */
export function parseContentRange(value: string | null): ContentRange | undefined {
  if (!value) return undefined;
  const m = /^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*\/\s*(\d+|\*)\s*$/i.exec(value);
  if (!m) return undefined;
  const total = m[3] === '*' ? undefined : Number(m[3]);
  if (m[1] === undefined) return { start: -1, end: -1, total };
  const start = Number(m[1]);
  const end = Number(m[2]);
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || end < start) return undefined;
  if (total !== undefined && (!Number.isSafeInteger(total) || end >= total)) return undefined;
  return { start, end, total };
}

/**
 * The whole body, refusing (before reading it when Content-Length tells) one longer than `limit`:
 * a server that ignores Range sends the whole image, which must not fill the memory. `expected`:
 * the length the caller asked for, when it knows it, or the buffer to read it into (the body is
 * then that buffer when it has exactly its length).
 */
export async function readBodyCapped(res: Response, limit: number, tooLarge: (length: number) => QcowError, expected?: number | Uint8Array): Promise<Uint8Array> {
  const declared = res.headers.get('content-length');
  // Content-Length counts encoded bytes when the body is compressed; only trust it when it is not.
  if (declared !== null && !res.headers.get('content-encoding') && Number(declared) > limit) {
    discardBody(res);
    throw tooLarge(Number(declared));
  }
  if (!res.body) return new Uint8Array(0);
  const body = new BodyCollector(limit, tooLarge, expected);
  // On Node (node-fetch.node.ts) the body is also a Node stream: its pieces are taken as events,
  // not one promise per ~64 KiB piece as a reader (or an async iterator) needs.
  const nodeBody = (res as { nodeBody?: NodeBody }).nodeBody;
  if (nodeBody) return readNodeBody(nodeBody, body);
  const reader = res.body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (!body.add(value)) {
        await reader.cancel().catch(() => undefined);
        throw tooLarge(body.length);
      }
    }
  } catch (e) {
    throw connectionLost(e);
  } finally {
    reader.releaseLock();
  }
  return body.result();
}

interface NodeBody {
  on(event: 'data', listener: (piece: Uint8Array) => void): unknown;
  on(event: 'end' | 'close', listener: () => void): unknown;
  on(event: 'error', listener: (e: unknown) => void): unknown;
  destroy(): void;
  readableEnded?: boolean;
}

function readNodeBody(stream: NodeBody, body: BodyCollector): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (e: unknown) => {
      if (settled) return;
      settled = true;
      stream.destroy();
      reject(connectionLost(e));
    };
    stream.on('data', (piece) => {
      if (!settled && !body.add(piece)) fail(body.tooLargeError());
    });
    stream.on('end', () => {
      if (settled) return;
      settled = true;
      resolve(body.result());
    });
    stream.on('error', fail);
    // Destroyed before its end (an abort, a lost connection): not a whole body.
    stream.on('close', () => fail(new Error('the connection closed before the end of the body')));
  });
}

/** A QcowError as it is; anything else (the connection broke mid-body) is worth another try. */
function connectionLost(e: unknown): Error {
  if (e instanceof QcowError) return e;
  return new TransientHttpError(`connection lost while reading the body: ${(e as Error).message ?? e}`, undefined, { cause: e });
}

/**
 * The pieces of a body, joined. When the length is known (a range reply), they go straight into
 * the result as they come: keeping every piece until the end made most of the garbage of a 1 GiB
 * convert over HTTP.
 */
class BodyCollector {
  length = 0;
  private readonly parts: Uint8Array[] = [];
  private direct: Uint8Array | undefined;

  constructor(
    private readonly limit: number,
    private readonly tooLarge: (length: number) => QcowError,
    expected: number | Uint8Array | undefined,
  ) {
    if (expected instanceof Uint8Array) this.direct = expected.length <= limit ? expected : undefined;
    else this.direct = expected !== undefined && expected <= limit ? new Uint8Array(expected) : undefined;
  }

  /** Take a piece; false when the body is now longer than the limit. */
  add(piece: Uint8Array): boolean {
    if (this.direct) {
      if (this.length + piece.length <= this.direct.length) {
        this.direct.set(piece, this.length);
        this.length += piece.length;
        return true;
      }
      // More than announced: on with a list of pieces (the caller's length check decides).
      this.parts.push(this.direct.subarray(0, this.length));
      this.direct = undefined;
    }
    this.length += piece.length;
    if (this.length > this.limit) return false;
    this.parts.push(piece);
    return true;
  }

  tooLargeError(): QcowError {
    return this.tooLarge(this.length);
  }

  result(): Uint8Array {
    if (this.direct) return this.length === this.direct.length ? this.direct : this.direct.subarray(0, this.length);
    if (this.parts.length === 1) return this.parts[0]!;
    const out = new Uint8Array(this.length);
    let at = 0;
    for (const p of this.parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
}
