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
 * conversion could not go on without anyway. (The CLI writes the target synchronously too,
 * FileStore.writeInline: a write on the thread pool only let the next read race the pipe's writer
 * for the pipe's lock.) Every few MiB the reader lets the event loop run (timers of the progress
 * bar, Ctrl-C), so a long stream does not hold them off.
 *
 * A pipe's writer may keep it open and send nothing for a long time. A blocking read(2) would then
 * hold the event loop, and a SIGINT or SIGTERM sent to this process alone would wait for the next
 * bytes (Node restarts the read after its signal handler). So where the host addon offers it, a
 * pipe is read with reads that never wait (preadv2 RWF_NOWAIT; a named pipe, which the kernel may
 * not offer that for, gets a poll(2) before each read), and when there is nothing to read the
 * source waits with poll(2) for at most {@link WAIT_MS} at a time, letting
 * the event loop run in between: signal handlers, timers and finished writes of the target, and
 * the caller's abort signal ends the read. Without the addon: blocking reads, as described.
 */
import { fstatSync, readSync } from 'node:fs';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { hostAddon } from '../host/native.node.js';
import type { StreamSource } from './cluster-reader.js';

/** Bytes read between two turns of the event loop. */
const TURN_BYTES = 8 * 1024 * 1024;
/**
 * The pipe buffer asked for (the kernel's default is 64 KiB; 1 MiB is what it grants the
 * unprivileged by default). With 64 KiB, `cat` and we took turns: each read found at most 64 KiB
 * and the next one waited for the writer, two context switches per 64 KiB (~34k per GiB, and most
 * of the CPU of a pipe convert was the kernel's). A 1 MiB buffer lets a read take up to a slab's
 * worth of what the writer sent meanwhile.
 */
const PIPE_BYTES = 1024 * 1024;
/** Longest the event loop waits behind a poll of a silent pipe (a signal cuts it short anyway). */
const WAIT_MS = 100;

interface PipeReads {
  readNoWait(fd: number, into: Uint8Array): number;
  waitReadable(fd: number, ms: number): boolean;
  /** Whether readNoWait works on this pipe; else a poll comes before each blocking read. */
  noWait: boolean;
}

/** A pipe's non-waiting read and poll, from the host addon; undefined for files or without them. */
function pipeReads(fd: number): PipeReads | undefined {
  const addon = hostAddon();
  if (!addon?.readNoWait || !addon.waitReadable) return undefined;
  try {
    // A file never makes a reader wait for a writer: read(2) it as it is.
    if (!fstatSync(fd).isFIFO()) return undefined;
    addon.growPipe?.(fd, PIPE_BYTES);
    return { readNoWait: addon.readNoWait, waitReadable: addon.waitReadable, noWait: true };
  } catch {
    return undefined;
  }
}

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
  /** Non-waiting reads of a pipe: undefined until the first read decides, false when not used. */
  let pipe: PipeReads | false | undefined;

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
    async read(into: Uint8Array, signal?: AbortSignal): Promise<number> {
      if (chunks) return fromChunks(into);
      if (sinceTurn >= TURN_BYTES) {
        sinceTurn = 0;
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
      pipe ??= pipeReads(fd) ?? false;
      while (pipe) {
        if (pipe.noWait) {
          let n: number;
          try {
            n = pipe.readNoWait(fd, into);
          } catch (e) {
            throw new QcowError('QCOW_IO', `reading ${name}: ${(e as Error).message}`, { cause: e });
          }
          if (n >= 0) {
            sinceTurn += n;
            return n;
          }
          // -2: no RWF_NOWAIT for this pipe (a named pipe, on this kernel): poll before each read.
          if (n === -2) pipe.noWait = false;
        }
        if (!pipe.noWait && pipe.waitReadable(fd, 0)) break;
        // The writer has sent nothing yet: wait for it, giving the event loop a turn now and then.
        while (!pipe.waitReadable(fd, WAIT_MS)) {
          await new Promise<void>((resolve) => setImmediate(resolve));
          throwIfAborted(signal);
        }
        // Readable: a read(2) below returns at once; non-waiting reads try again.
        if (!pipe.noWait) break;
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
