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
 * the length the caller asked for, when it knows it.
 */
export async function readBodyCapped(res: Response, limit: number, tooLarge: (length: number) => QcowError, expected?: number): Promise<Uint8Array> {
  const declared = res.headers.get('content-length');
  // Content-Length counts encoded bytes when the body is compressed; only trust it when it is not.
  if (declared !== null && !res.headers.get('content-encoding') && Number(declared) > limit) {
    discardBody(res);
    throw tooLarge(Number(declared));
  }
  if (!res.body) return new Uint8Array(0);
  // On Node (node-fetch.node.ts) the body is also a Node stream: read it without WHATWG streams.
  const nodeBody = (res as { nodeBody?: AsyncIterable<Uint8Array> & { destroy(): void } }).nodeBody;
  const reader = nodeBody ? undefined : res.body.getReader();
  const pieces: AsyncIterator<Uint8Array> | undefined = nodeBody?.[Symbol.asyncIterator]();
  const next = (): Promise<ReadableStreamReadResult<Uint8Array>> =>
    pieces ? (pieces.next() as Promise<ReadableStreamReadResult<Uint8Array>>) : reader!.read();
  const cancel = async (): Promise<void> => {
    if (nodeBody) nodeBody.destroy();
    else await reader!.cancel().catch(() => undefined);
  };
  const parts: Uint8Array[] = [];
  let length = 0;
  // When the length is known (a range reply), bytes go straight into the result as they come:
  // keeping every piece until the end made most of the garbage of a 1 GiB convert over HTTP.
  let direct = expected !== undefined && expected <= limit ? new Uint8Array(expected) : undefined;
  try {
    for (;;) {
      const { done, value } = await next();
      if (done) break;
      if (direct) {
        if (length + value.length <= direct.length) {
          direct.set(value, length);
          length += value.length;
          continue;
        }
        // More than announced: on with a list of pieces (the caller's length check decides).
        parts.push(direct.subarray(0, length));
        direct = undefined;
      }
      length += value.length;
      if (length > limit) {
        await cancel();
        throw tooLarge(length);
      }
      parts.push(value);
    }
  } catch (e) {
    if (e instanceof QcowError) throw e;
    // The connection broke mid-body: worth another try.
    throw new TransientHttpError(`connection lost while reading the body: ${(e as Error).message ?? e}`, undefined, { cause: e });
  } finally {
    reader?.releaseLock();
  }
  if (direct) return length === direct.length ? direct : direct.subarray(0, length);
  if (parts.length === 1) return parts[0]!;
  const out = new Uint8Array(length);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
