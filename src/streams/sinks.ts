/**
 * Where a streamed image goes: adapters from the stream kinds users hold to a ChunkSink (one chunk
 * at a time, in order, the next once the previous is accepted). Node's Writable is in
 * node-sink.node.ts; this module stays browser-safe.
 */
import { QcowError } from '../core/errors.js';
import type { ChunkSink } from './write-image.js';

/**
 * A web WritableStream (a browser download through the File System Access API or a service
 * worker, a `fetch` upload body's writable side, a TransformStream). Each chunk waits until the
 * stream has taken it; `close()` ends the stream once the image is complete, `abort`
 * tells the consumer it is not.
 *
 * @example
 * ```ts
 * import { openUrl, writeImageStream, webStreamSink } from 'qcow/browser';
 *
 * const handle = await showSaveFilePicker({ suggestedName: 'disk.qcow2' });
 * const out = webStreamSink(await handle.createWritable());
 * try {
 *   await writeImageStream([await openUrl('disk.img')], out.sink, { format: 'qcow2' });
 *   await out.close();
 * } catch (e) {
 *   await out.abort(e);
 *   throw e;
 * }
 * ```
 */
export function webStreamSink(stream: WritableStream<Uint8Array>): {
  /** The sink to give {@link writeImageStream}. */
  sink: ChunkSink;
  /** Close the stream: call it once the image is written. */
  close(): Promise<void>;
  /** Abort the stream with `reason`: the image is incomplete. */
  abort(reason: unknown): Promise<void>;
} {
  const writer = stream.getWriter();
  return {
    // write() resolves when the underlying sink has taken the chunk: the writer may then reuse it.
    sink: async (chunk) => {
      await writer.ready;
      await writer.write(chunk);
    },
    close: () => writer.close(),
    abort: (reason) => writer.abort(reason).catch(() => undefined),
  };
}

/** Wrap a sink so that a consumer's failure reads as one line about the stream. */
export function describeSinkErrors(sink: ChunkSink, name: string): ChunkSink {
  const describe = (e: unknown): never => {
    if (e instanceof QcowError) throw e;
    const code = (e as NodeJS.ErrnoException | undefined)?.code;
    const why = code === 'EPIPE' ? 'the reader closed it before the image was complete' : e instanceof Error ? e.message : String(e);
    throw new QcowError('QCOW_IO', `cannot write to ${name}: ${why}`, { cause: e });
  };
  const described: ChunkSink = (chunk) => sink(chunk).catch(describe);
  const from = sink.fromStore;
  if (from) described.fromStore = (store, at, length) => from(store, at, length).catch(describe);
  return described;
}
