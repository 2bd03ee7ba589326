/**
 * A file descriptor (standard output: a pipe or a file) as a ChunkSink, written with write(2) on
 * libuv's thread pool, and for a pipe, data the source holds as plain file bytes spliced into it.
 *
 * Why not `process.stdout` (nodeWritableSink): Node makes a pipe non-blocking and writes what fits
 * (64 KiB, the pipe's default size), then waits in epoll for room: for 512 MiB that was ~8.7k
 * writes and ~14.6k epoll waits for `convert -f raw -O qcow2 mixed.raw - | cat` (512 MiB). Here the
 * pipe is grown to 1 MiB (what the kernel grants the unprivileged) and each chunk is one blocking
 * write on the pool; the event loop stays free (progress bar, signals): our CPU ~300 -> ~250 ms
 * (perf stat, alternating runs, a loaded machine). Data the source stores as plain bytes of a
 * local file is not read at all: splice(2) hands the file's page-cache pages to the pipe and the
 * reader's read is the only copy: ~250 -> ~83 ms (no 2 MiB reads into our memory, no copies out).
 * Not vmsplice(2) of our buffers: it saved ~40 ms per 512 MiB in a C test, but a reader that
 * splices the pipe on (pv, into a socket) keeps referring to our pages after it has "read" them,
 * so no buffer could ever safely be reused.
 */
import { fstatSync, write } from 'node:fs';
import { QcowError } from '../core/errors.js';
import { hostAddon } from '../host/native.node.js';
import type { ByteStore } from '../storage/types.js';
import type { ChunkSink } from './write-image.js';

/** The pipe buffer asked for: the kernel's default (64 KiB) makes a write per 64 KiB. */
const PIPE_BYTES = 1024 * 1024;

/** Retry a write that found the descriptor non-blocking (someone else set O_NONBLOCK) and full. */
function pause(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function writeOnce(fd: number, chunk: Uint8Array, from: number): Promise<number> {
  return new Promise((resolve, reject) => write(fd, chunk, from, chunk.length - from, null, (e, n) => (e ? reject(e) : resolve(n))));
}

/**
 * `fd` as the sink of {@link writeImageStream}; the descriptor stays open (the caller's).
 *
 * @example
 * ```ts
 * import { openImage, writeImageStream, fdSink } from 'qcow/node';
 *
 * await using src = await openImage('disk.img', { readOnly: true });
 * await writeImageStream([src], fdSink(1).sink, { format: 'qcow2' }); // node this.js | ssh host 'cat > disk.qcow2'
 * ```
 */
export function fdSink(fd: number): {
  /** The sink to give {@link writeImageStream}. */
  sink: ChunkSink;
  /** Resolves once everything written has been handed to the operating system (every write is awaited already). */
  finish(): Promise<void>;
} {
  let pipe = false;
  try {
    pipe = fstatSync(fd).isFIFO();
  } catch {
    // A descriptor fstat refuses: the first write says what is wrong with it.
  }
  if (pipe) hostAddon()?.growPipe?.(fd, PIPE_BYTES);
  let failure: unknown;
  const sink: ChunkSink = async (chunk) => {
    if (failure !== undefined) throw failure;
    try {
      for (let done = 0; done < chunk.length; ) {
        try {
          done += await writeOnce(fd, chunk, done);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
          await pause(1);
        }
      }
    } catch (e) {
      failure ??= e;
      throw e;
    }
  };
  // Splice only into a pipe (the kernel's rule), and stop trying after a file that cannot.
  let splice = pipe;
  sink.fromStore = async (store: ByteStore, from: number, length: number) => {
    if (failure !== undefined) throw failure;
    if (!splice || !store.spliceTo) return 0;
    try {
      return await store.spliceTo(fd, from, length);
    } catch (e) {
      if (e instanceof QcowError && e.code === 'QCOW_UNSUPPORTED') {
        splice = false;
        return 0;
      }
      failure ??= e;
      throw e;
    }
  };
  return { sink, finish: () => (failure !== undefined ? Promise.reject(failure) : Promise.resolve()) };
}
