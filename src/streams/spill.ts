/**
 * Where a compressed stream keeps its clusters until the tables that point at them are written
 * (write-image.ts explains why compressed output needs one). `memorySpill` holds them in memory,
 * up to a limit; `fileSpill` in spill-file.node.ts keeps them in a temporary file.
 */
import { QcowError } from '../core/errors.js';

/**
 * Where compressed clusters wait while a compressed qcow2 stream is written
 * ({@link WriteStreamOptions.spill}): append-only bytes read back later. {@link memorySpill} and
 * `fileSpill` (`qcow/node`) make one; implement it to keep them elsewhere.
 */
export interface Spill {
  /** Bytes appended so far. */
  readonly size: number;
  /** Add `data` at the end (copying it or writing it out: the caller reuses the buffer). */
  append(data: Uint8Array): Promise<void>;
  /** Fill `into` from `offset` (within what was appended). */
  read(offset: number, into: Uint8Array): Promise<void>;
  /** Release what it holds (delete the file). */
  close(): Promise<void>;
}

/** Chunks in memory; more than `limit` bytes fails with a line that says what to do. */
export function memorySpill(limit = 256 * 1024 * 1024): Spill {
  const chunks: Uint8Array[] = [];
  const starts: number[] = [];
  let size = 0;
  return {
    get size() {
      return size;
    },
    async append(data) {
      if (size + data.length > limit) {
        throw new QcowError('QCOW_UNSUPPORTED', `compressed stream output needs more than its ${limit} bytes of memory for the compressed clusters: give it a spill folder (spill option, or TMPDIR for the CLI)`);
      }
      starts.push(size);
      chunks.push(data.slice());
      size += data.length;
    },
    async read(offset, into) {
      // The chunk holding `offset`, then onwards.
      let lo = 0;
      let hi = starts.length - 1;
      while (lo < hi) {
        const mid = (lo + hi + 1) >> 1;
        if (starts[mid]! <= offset) lo = mid;
        else hi = mid - 1;
      }
      for (let i = lo, done = 0; done < into.length; i++) {
        const c = chunks[i];
        if (!c) throw new QcowError('QCOW_INVALID_ARGUMENT', `internal: spill read past its end (${offset + done})`);
        const from = offset + done - starts[i]!;
        const n = Math.min(c.length - from, into.length - done);
        into.set(c.subarray(from, from + n), done);
        done += n;
      }
    },
    async close() {
      chunks.length = 0;
      starts.length = 0;
    },
  };
}
