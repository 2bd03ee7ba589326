/**
 * Shapes other programs already consume, over any BlockDevice:
 * - the disk-buffer object of the v86 emulator (`byteLength`, `load()`, callback `get`/`set`);
 * - an async buffer, `{ byteLength, slice(start, end) }`, as hyparquet and similar readers take.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';

/** The disk-buffer object the v86 emulator takes as `hda`/`cdrom` `buffer` (see {@link asV86Buffer}). */
export interface V86Buffer {
  /** The disk's size in bytes. */
  readonly byteLength: number;
  /** v86 sets these and calls load() before use; we have nothing to preload. */
  onload: ((e: { buffer?: ArrayBuffer }) => void) | undefined;
  /** Set by v86; never called (nothing is preloaded). */
  onprogress: ((e: { loaded: number; total: number; lengthComputable: boolean }) => void) | undefined;
  /** Calls `onload` at once: the image is read lazily. */
  load(): void;
  /** Read `length` bytes at `offset` and pass them to `done`. */
  get(offset: number, length: number, done: (data: Uint8Array) => void): void;
  /** Write a copy of `data` at `offset`, then call `done`. */
  set(offset: number, data: Uint8Array, done: () => void): void;
  /** v86 asks for the whole disk when saving it; a lazily read image has no such buffer. */
  get_buffer(done: (buffer: ArrayBuffer | undefined) => void): void;
}

/** Options of {@link asV86Buffer}. */
export interface V86BufferOptions {
  /**
   * Called when a read or write fails. The emulator's interface has no error path, so the
   * request's callback is never called; the default reports to console.error.
   */
  onError?: (error: unknown, request: { op: 'get' | 'set'; offset: number; length: number }) => void;
}

/**
 * `dev` as a v86 disk buffer (e.g. `new V86({ hda: { buffer: asV86Buffer(disk) } })`). Writes go
 * to `dev`, so give it a writable device: an overlay over a remote image.
 *
 * @example
 * ```ts
 * import { openUrl, asV86Buffer } from 'qcow/browser';
 *
 * const disk = await openUrl('https://example.com/disk.qcow2', { writable: true });
 * const emulator = new V86({ wasm_path: 'v86.wasm', hda: { buffer: asV86Buffer(disk) } });
 * ```
 */
export function asV86Buffer(dev: BlockDevice, options: V86BufferOptions = {}): V86Buffer {
  const onError =
    options.onError ??
    ((e, r) => {
      console.error(`qcow: ${r.op} ${r.offset}+${r.length} on ${dev.filename} failed:`, e);
    });
  return {
    byteLength: dev.size,
    onload: undefined,
    onprogress: undefined,
    load() {
      this.onload?.({});
    },
    get(offset, length, done) {
      const data = new Uint8Array(length);
      dev.read(offset, data).then(
        () => done(data),
        (e: unknown) => onError(e, { op: 'get', offset, length }),
      );
    },
    set(offset, data, done) {
      // v86 may reuse the array it passed once we return: write a copy.
      dev.write(offset, data.slice()).then(
        () => done(),
        (e: unknown) => onError(e, { op: 'set', offset, length: data.length }),
      );
    },
    get_buffer(done) {
      done(undefined);
    },
  };
}

/** A read-only async buffer, `{ byteLength, slice }`, as hyparquet and similar readers take (see {@link asAsyncBuffer}). */
export interface AsyncBuffer {
  /** The guest content's size in bytes. */
  readonly byteLength: number;
  /** Bytes [start, end) of the guest content (end defaults to the end; negative counts from it). */
  slice(start: number, end?: number): Promise<ArrayBuffer>;
}

/**
 * `dev`'s guest content as an async buffer: each `slice` reads those guest bytes.
 *
 * @example
 * ```ts
 * import { openUrl, asAsyncBuffer } from 'qcow/browser';
 *
 * const buf = asAsyncBuffer(await openUrl('https://example.com/disk.qcow2'));
 * const mbr = new Uint8Array(await buf.slice(0, 512));
 * ```
 */
export function asAsyncBuffer(dev: BlockDevice): AsyncBuffer {
  return {
    byteLength: dev.size,
    async slice(start, end) {
      const from = clampIndex(start, dev.size);
      const to = end === undefined ? dev.size : clampIndex(end, dev.size);
      const out = new Uint8Array(Math.max(0, to - from));
      if (out.length > 0) await dev.read(from, out);
      return out.buffer;
    },
  };
}

/** As Array.prototype.slice treats its arguments. */
function clampIndex(i: number, size: number): number {
  if (Number.isNaN(i)) throw new QcowError('QCOW_INVALID_ARGUMENT', 'slice index is not a number');
  const n = Math.trunc(i);
  return n < 0 ? Math.max(0, size + n) : Math.min(n, size);
}
