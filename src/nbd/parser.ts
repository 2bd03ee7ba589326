/**
 * Incremental parser of what an NBD client sends. Bytes are pushed as they arrive; `next()` cuts
 * off one whole message when there is one. The phase (what comes next: the client flags, an
 * option, or a request) is set by the connection between messages, since it alone knows when
 * option haggling is over.
 *
 * Payloads larger than the limits are never buffered: the message is returned without them and
 * their bytes are dropped as they arrive, so the connection can answer with an error and go on.
 *
 * A write payload that has not all arrived with its header is received into a buffer of its own
 * size as it comes (pushed chunks are copied into it, and the connection may read the socket
 * straight into what is left of it: payloadRoom), not kept as chunks and copied out once whole.
 * Its buffer comes from `allocPayload`, which need not zero it: every byte is written before the
 * request is returned.
 */
import { NBD_CMD_WRITE, NBD_OPTS_MAGIC, NBD_REQUEST_MAGIC, OPTION_HEADER_SIZE, REQUEST_HEADER_SIZE, MAX_PAYLOAD } from './constants.js';
import { NbdProtocolError } from './errors.js';
import type { ClientMessage, ClientOption, Request } from './messages.js';
import { ByteQueue, Reader } from './wire.js';

export type Phase = 'flags' | 'option' | 'request';

export interface ParserLimits {
  /** Longest option payload kept; longer ones are skipped (the server replies NBD_REP_ERR_TOO_BIG). */
  maxOptionLength: number;
  /** Longest write payload kept; longer ones are skipped (the server replies with an error). */
  maxPayload: number;
}

export const DEFAULT_LIMITS: ParserLimits = { maxOptionLength: 64 * 1024, maxPayload: MAX_PAYLOAD };

export class ClientParser {
  phase: Phase = 'flags';
  private readonly queue = new ByteQueue();
  /** Bytes still to drop for an oversized message already returned. */
  private skipping = 0;
  /** A write whose header is parsed and whose payload is still arriving (into `payload`). */
  private partial: { request: Request; payload: Uint8Array; filled: number } | undefined;

  constructor(
    private readonly limits: ParserLimits = DEFAULT_LIMITS,
    private readonly allocPayload: (size: number) => Uint8Array = (size) => new Uint8Array(size),
  ) {}

  push(chunk: Uint8Array): void {
    const p = this.partial;
    if (p && p.filled < p.payload.length && chunk.length) {
      const n = Math.min(chunk.length, p.payload.length - p.filled);
      p.payload.set(n === chunk.length ? chunk : chunk.subarray(0, n), p.filled);
      p.filled += n;
      chunk = chunk.subarray(n);
    }
    this.queue.push(chunk);
  }

  /**
   * The part of a write payload still to arrive, which the caller may fill with bytes read from the
   * stream itself (then payloadFilled) instead of pushing them; undefined when none is awaited.
   * Only bytes that come next in the stream may go there, i.e. when nothing pushed waits unparsed.
   */
  get payloadRoom(): Uint8Array | undefined {
    const p = this.partial;
    return p && p.filled < p.payload.length && this.queue.length === 0 ? p.payload.subarray(p.filled) : undefined;
  }

  /** Bytes still missing of the next request's header (0 when not waiting for one). */
  get headerNeed(): number {
    if (this.phase !== 'request' || this.partial || this.skipping > 0) return 0;
    return Math.max(0, REQUEST_HEADER_SIZE - this.queue.length);
  }

  /** `n` bytes were written at the start of payloadRoom. */
  payloadFilled(n: number): void {
    this.partial!.filled += n;
  }

  /** Bytes received and not yet parsed or skipped. */
  get buffered(): number {
    return this.queue.length + (this.partial ? REQUEST_HEADER_SIZE + this.partial.filled : 0);
  }

  /** The next whole message, or undefined until more bytes arrive. Throws NbdProtocolError when the stream is garbage. */
  next(): ClientMessage | undefined {
    if (this.skipping > 0) this.skipping -= this.queue.skip(this.skipping);
    if (this.skipping > 0) return undefined;
    if (this.partial) {
      const { request, payload, filled } = this.partial;
      if (filled < payload.length) return undefined;
      this.partial = undefined;
      request.payload = payload;
      return request;
    }
    switch (this.phase) {
      case 'flags':
        if (this.queue.length < 4) return undefined;
        return { kind: 'flags', flags: new Reader(this.queue.take(4)).u32() };
      case 'option':
        return this.nextOption();
      case 'request':
        return this.nextRequest();
    }
  }

  private nextOption(): ClientOption | undefined {
    if (this.queue.length < OPTION_HEADER_SIZE) return undefined;
    const r = new Reader(this.queue.peek(OPTION_HEADER_SIZE));
    const magic = r.u64();
    if (magic !== NBD_OPTS_MAGIC) throw new NbdProtocolError('NBD_BAD_MAGIC', `bad option magic 0x${magic.toString(16)}`);
    const option = r.u32();
    const length = r.u32();
    if (length > this.limits.maxOptionLength) {
      this.queue.skip(OPTION_HEADER_SIZE);
      this.skipping = length - this.queue.skip(length);
      return { kind: 'option', option, length };
    }
    if (this.queue.length < OPTION_HEADER_SIZE + length) return undefined;
    this.queue.skip(OPTION_HEADER_SIZE);
    return { kind: 'option', option, length, data: this.queue.take(length) };
  }

  private nextRequest(): Request | undefined {
    if (this.queue.length < REQUEST_HEADER_SIZE) return undefined;
    const r = new Reader(this.queue.peek(REQUEST_HEADER_SIZE));
    const magic = r.u32();
    if (magic !== NBD_REQUEST_MAGIC) throw new NbdProtocolError('NBD_BAD_MAGIC', `bad request magic 0x${magic.toString(16)}`);
    const flags = r.u16();
    const type = r.u16();
    const cookie = r.raw(8).slice();
    const offset64 = r.u64();
    const length = r.u32();
    // Past 2^53 an offset is not exact as a number; it is beyond any export, so say so plainly.
    const offset = offset64 <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(offset64) : Number.POSITIVE_INFINITY;
    const request: Request = { kind: 'request', flags, type, cookie, offset, length };
    if (type !== NBD_CMD_WRITE) {
      this.queue.skip(REQUEST_HEADER_SIZE);
      return request;
    }
    if (length > this.limits.maxPayload) {
      this.queue.skip(REQUEST_HEADER_SIZE);
      this.skipping = length - this.queue.skip(length);
      return request;
    }
    this.queue.skip(REQUEST_HEADER_SIZE);
    // A payload inside one received chunk is a view of it; anything else gets a buffer of its own.
    const view = this.queue.view(length);
    if (view) {
      this.queue.skip(length);
      request.payload = view;
      return request;
    }
    const payload = this.allocPayload(length);
    const have = Math.min(this.queue.length, length);
    this.queue.takeInto(payload.subarray(0, have));
    if (have === length) {
      request.payload = payload;
      return request;
    }
    this.partial = { request, payload, filled: have };
    return undefined;
  }
}
