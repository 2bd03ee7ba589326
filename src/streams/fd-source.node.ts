/**
 * A file descriptor (standard input: a pipe, or a file redirected into it) as a
 * {@link StreamSource}: `read(2)` into the reader's reused memory.
 *
 * Why not `process.stdin`: Node's stream hands every pipe read (64 KiB at most) over in a new
 * buffer. For a 1 GiB image that was ~16k buffers and ~20k first-touched pages (this VM pays
 * ~12-16 us for each), and the stream machinery on top; reading the same pipe with `readSync`
 * into one reused buffer took a third of the CPU (`cat` of 1 GiB into `node`: 0.30-0.36 s against
 * 0.76-1.37 s, and 2.6k against 12.3k page faults, `perf stat`). The reads are synchronous: a pipe
 * read returns what is there, and waits only while the writer has sent nothing, which the
 * conversion could not go on without anyway; writes of the target still in flight run on Node's
 * thread pool meanwhile. Every few MiB the reader lets the event loop run (timers of the progress
 * bar, Ctrl-C), so a long stream does not hold them off.
 *
 * While the writer keeps the pipe open and sends nothing, the event loop waits with the read, so
 * a SIGINT or SIGTERM sent to this process alone takes effect when the next bytes or the end
 * arrive (Node restarts the read after its signal handler; Ctrl-C in a terminal also stops the
 * writer, which ends the pipe at once). Reading through `process.stdin` behaved the same (the
 * readers look at the abort signal between pieces): a writer that sent 1 MB and slept 4 s, qcow
 * sent SIGTERM after 1 s, ended after 4.2 s either way. Waiting for readability with a timeout
 * (poll(2), which Node does not offer) would remove it.
 */
import { readSync } from 'node:fs';
import { QcowError } from '../core/errors.js';
import type { StreamSource } from './cluster-reader.js';

/** Bytes read between two turns of the event loop. */
const TURN_BYTES = 8 * 1024 * 1024;

/**
 * Read `fd` from its current position to its end. A descriptor set non-blocking by someone else
 * (a shell sharing it, `process.stdin` touched before) would make reads fail with EAGAIN: then
 * `fallback` (Node's own stream of it) gives the rest, copied into the reader's memory.
 *
 * @example
 * ```ts
 * import { fdSource, readImageStream } from 'qcow/node';
 * // cat disk.qcow2 | node this.js
 * await readImageStream(fdSource(0, () => process.stdin), openTarget, { targetIsZero: true });
 * ```
 */
export function fdSource(fd: number, fallback?: () => AsyncIterable<Uint8Array>, name = `file descriptor ${fd}`): StreamSource {
  let sinceTurn = 0;
  let chunks: AsyncIterator<Uint8Array> | undefined;
  let rest: Uint8Array | undefined;

  /** The fallback stream's bytes, as many as fit. */
  async function fromChunks(into: Uint8Array): Promise<number> {
    if (!rest || rest.length === 0) {
      const r = await chunks!.next();
      if (r.done) return 0;
      rest = r.value;
    }
    const n = Math.min(into.length, rest.length);
    into.set(rest.subarray(0, n));
    rest = rest.subarray(n);
    return n;
  }

  return {
    async read(into: Uint8Array): Promise<number> {
      if (chunks) return fromChunks(into);
      if (sinceTurn >= TURN_BYTES) {
        sinceTurn = 0;
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
      for (;;) {
        try {
          const n = readSync(fd, into, 0, into.length, null);
          sinceTurn += n;
          return n;
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if (code === 'EINTR') continue;
          if (code === 'EAGAIN' && fallback) {
            chunks = fallback()[Symbol.asyncIterator]();
            return fromChunks(into);
          }
          throw new QcowError('QCOW_IO', `reading ${name}: ${(e as Error).message}`, { cause: e });
        }
      }
    },
  };
}
