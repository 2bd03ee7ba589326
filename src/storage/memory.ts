/** A growable in-memory store: for tests, overlays and browser use. */
import type { ByteStore } from './types.js';
import { QcowError } from '../core/errors.js';

/**
 * A {@link ByteStore} in memory that grows as it is written: build an image without touching a
 * file, or hold one fetched from elsewhere.
 *
 * @example
 * ```ts
 * import { MemoryStore, rawFormat } from 'qcow';
 *
 * const store = new MemoryStore(new Uint8Array(4096), { name: 'scratch' });
 * const dev = await rawFormat.open(store);
 * await dev.write(0, new TextEncoder().encode('hello'));
 * console.log(store.bytes().subarray(0, 5)); // the bytes written
 * ```
 */
export class MemoryStore implements ByteStore {
  /** The name given at construction, "memory" by default. */
  readonly name: string;
  /** Writes and truncation fail with QCOW_READ_ONLY. */
  readonly readOnly: boolean;
  private buf: Uint8Array;
  private length: number;

  /** A store holding a copy of `initial` (empty without it). */
  constructor(initial?: Uint8Array, options: { name?: string; readOnly?: boolean } = {}) {
    this.name = options.name ?? 'memory';
    this.readOnly = options.readOnly ?? false;
    this.buf = initial ? initial.slice() : new Uint8Array(0);
    this.length = this.buf.length;
  }

  /** A copy of the current content. */
  bytes(): Uint8Array {
    return this.buf.slice(0, this.length);
  }

  async size(): Promise<number> {
    return this.length;
  }

  async read(offset: number, into: Uint8Array): Promise<number> {
    const n = Math.max(0, Math.min(into.length, this.length - offset));
    if (n > 0) into.set(this.buf.subarray(offset, offset + n));
    into.fill(0, n);
    return n;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) throw new QcowError('QCOW_READ_ONLY', `${this.name} is read-only`);
    const end = offset + data.length;
    this.ensureCapacity(end);
    this.buf.set(data, offset);
    if (end > this.length) this.length = end;
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new QcowError('QCOW_READ_ONLY', `${this.name} is read-only`);
    this.ensureCapacity(size);
    if (size < this.length) this.buf.fill(0, size, this.length);
    this.length = size;
  }

  async flush(): Promise<void> {}
  async close(): Promise<void> {}

  private ensureCapacity(n: number): void {
    if (n <= this.buf.length) return;
    const next = new Uint8Array(Math.max(n, Math.min(this.buf.length * 2, n + 64 * 2 ** 20)));
    next.set(this.buf.subarray(0, this.length));
    this.buf = next;
  }
}
