/**
 * A small pool for copy loops that are not convert: a list of ranges, each read into a buffer of
 * the pool's own and then handled, `parallel` at a time, so reads overlap writes. Buffers are
 * reused; memory is `parallel x chunk`.
 */
import { throwIfAborted } from '../core/errors.js';

export interface Range {
  offset: number;
  length: number;
}

/**
 * Run `step(range, buffer)` over `ranges` cut into pieces of at most `chunk` bytes; `buffer` is the
 * worker's own, `bufferBytes` long (default `chunk`), reused for every piece. The iterator is
 * pulled lazily, so huge images never hold a list of every piece. The first failure stops the
 * pool (pieces under way finish) and is thrown.
 */
export async function forEachPiece(
  ranges: AsyncIterable<Range> | Iterable<Range>,
  chunk: number,
  parallel: number,
  step: (piece: Range, buf: Uint8Array) => Promise<void>,
  signal?: AbortSignal,
  bufferBytes = chunk,
): Promise<void> {
  async function* pieces(): AsyncGenerator<Range> {
    for await (const r of ranges) {
      for (let off = r.offset; off < r.offset + r.length; off += chunk) yield { offset: off, length: Math.min(chunk, r.offset + r.length - off) };
    }
  }
  const it = pieces();
  let pulling: Promise<unknown> = Promise.resolve();
  const take = (): Promise<IteratorResult<Range>> => {
    const p = pulling.then(() => it.next());
    pulling = p.catch(() => undefined);
    return p;
  };
  let failure: unknown;
  const worker = async () => {
    const buf = new Uint8Array(Math.max(chunk, bufferBytes));
    while (failure === undefined) {
      throwIfAborted(signal);
      const r = await take();
      if (r.done) return;
      await step(r.value, buf);
    }
  };
  await Promise.all(
    Array.from({ length: Math.max(1, parallel) }, () =>
      worker().catch((e: unknown) => {
        failure ??= e;
      }),
    ),
  );
  if (failure !== undefined) {
    await it.return(undefined).catch(() => undefined);
    throw failure;
  }
}
