/**
 * A Node Writable (process.stdout, a socket, an HTTP request body, fs.createWriteStream) as a
 * ChunkSink. The stream's first error fails every later chunk, so a reader that goes away (EPIPE)
 * stops the image.
 */
import type { Writable } from 'node:stream';
import type { ChunkSink } from './write-image.js';

/**
 * `stream` as the sink of {@link writeImageStream}; call `finish` once the image is written.
 *
 * @example
 * ```ts
 * import { createWriteStream } from 'node:fs';
 * import { openImage, writeImageStream, nodeWritableSink } from 'qcow/node';
 *
 * await using src = await openImage('disk.qcow2', { readOnly: true });
 * const out = nodeWritableSink(createWriteStream('copy.qcow2'));
 * await writeImageStream([src], out.sink, { format: 'qcow2' });
 * await out.finish();
 * ```
 */
export function nodeWritableSink(stream: Writable | NodeJS.WritableStream): {
  /** The sink to give {@link writeImageStream}. */
  sink: ChunkSink;
  /** Resolves once everything written has been handed to the operating system (ends the stream, except stdout and stderr). */
  finish(): Promise<void>;
} {
  let failure: unknown;
  stream.on('error', (e: unknown) => {
    failure ??= e;
  });
  // A chunk is done when its write callback says it reached the operating system: the writer
  // reuses the memory then. (write() returning true only means the stream queued it.)
  const sink: ChunkSink = (chunk) =>
    new Promise<void>((resolve, reject) => {
      if (failure !== undefined) return reject(failure);
      stream.write(chunk, (e?: Error | null) => {
        if (e) failure ??= e;
        if (failure !== undefined) reject(failure);
        else resolve();
      });
    });
  return {
    sink,
    // Resolves once everything written has been handed to the operating system.
    finish: () =>
      new Promise<void>((resolve, reject) => {
        if (failure !== undefined) return reject(failure);
        const isStdio = stream === process.stdout || stream === process.stderr;
        // process.stdout cannot be ended; an empty write's callback comes after earlier writes.
        if (isStdio) stream.write(new Uint8Array(0), (e?: Error | null) => (e ? reject(e) : resolve()));
        else stream.end(() => (failure !== undefined ? reject(failure) : resolve()));
      }),
  };
}
