/**
 * Byte plumbing for the NBD codecs: a queue of received chunks that messages are cut from, and
 * big-endian field writers. Everything on the NBD wire is big-endian.
 */

/** Received bytes not yet parsed. Chunks are kept as they came; only what is taken is copied. */
export class ByteQueue {
  private chunks: Uint8Array[] = [];
  private head = 0; // bytes of chunks[0] already consumed
  length = 0;

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** The next `n` bytes without consuming them (n <= length). */
  peek(n: number): Uint8Array {
    const first = this.chunks[0];
    if (first && first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = new Uint8Array(n);
    let filled = 0;
    let skip = this.head;
    for (const c of this.chunks) {
      const part = c.subarray(skip, skip + (n - filled));
      out.set(part, filled);
      filled += part.length;
      skip = 0;
      if (filled === n) break;
    }
    return out;
  }

  /** Consume the next `into.length` bytes (at most length) by copying them into `into`. */
  takeInto(into: Uint8Array): void {
    let filled = 0;
    while (filled < into.length) {
      const c = this.chunks[0]!;
      const part = c.subarray(this.head, this.head + (into.length - filled));
      into.set(part, filled);
      filled += part.length;
      this.skip(part.length);
    }
  }

  /** The next `n` bytes when they lie in one received chunk (a view, not a copy), else undefined. */
  view(n: number): Uint8Array | undefined {
    const first = this.chunks[0];
    return first && first.length - this.head >= n ? first.subarray(this.head, this.head + n) : undefined;
  }

  /** Consume and return the next `n` bytes (n <= length). */
  take(n: number): Uint8Array {
    const out = this.peek(n);
    this.skip(n);
    return out;
  }

  /** Drop up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    const todo = Math.min(n, this.length);
    let left = todo;
    while (left > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (avail > left) {
        this.head += left;
        left = 0;
      } else {
        left -= avail;
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.length -= todo;
    return todo;
  }
}

/** A fixed-size big-endian message under construction. */
export class Writer {
  readonly bytes: Uint8Array;
  private readonly view: DataView;
  private pos = 0;

  /** A new buffer of `size` bytes, or fields written at the start of an existing one. */
  constructor(size: number | Uint8Array) {
    this.bytes = typeof size === 'number' ? new Uint8Array(size) : size;
    this.view = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength);
  }

  u16(v: number): this {
    this.view.setUint16(this.pos, v);
    this.pos += 2;
    return this;
  }

  u32(v: number): this {
    this.view.setUint32(this.pos, v);
    this.pos += 4;
    return this;
  }

  u64(v: number | bigint): this {
    this.view.setBigUint64(this.pos, typeof v === 'bigint' ? v : BigInt(v));
    this.pos += 8;
    return this;
  }

  raw(data: Uint8Array): this {
    this.bytes.set(data, this.pos);
    this.pos += data.length;
    return this;
  }
}

/** Big-endian field readers over a message already cut out of the stream. */
export class Reader {
  private readonly view: DataView;
  pos = 0;

  constructor(readonly bytes: Uint8Array) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get left(): number {
    return this.bytes.length - this.pos;
  }

  u16(): number {
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }

  u32(): number {
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }

  u64(): bigint {
    const v = this.view.getBigUint64(this.pos);
    this.pos += 8;
    return v;
  }

  raw(n: number): Uint8Array {
    const v = this.bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
}

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder('utf-8', { fatal: true });

export const utf8 = (s: string): Uint8Array => encoder.encode(s);

/** Decode UTF-8, or undefined when the bytes are not valid UTF-8 (the spec requires it of strings). */
export function decodeUtf8(bytes: Uint8Array): string | undefined {
  try {
    return strictDecoder.decode(bytes);
  } catch {
    return undefined;
  }
}
