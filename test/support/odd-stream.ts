/**
 * Streams that hand bytes over at odd sizes, as pipes and HTTP bodies do: the stream readers
 * must give the same pieces whatever the sizes, smaller or larger than a cluster.
 */
import type { StreamSource } from '#src/streams/cluster-reader.js';

/** Sizes that straddle every boundary the readers care about (512-byte sectors, 64 KiB clusters, MiB slabs). */
export const ODD_SIZES = [1, 511, 4099, 65_535, 65_537, 200_001, 3 * 2 ** 20 + 5];

/** A source that gives at most the next of `sizes` bytes per read (cycling), as a pipe would; `reads` counts its reads. */
export function oddSource(data: Uint8Array, sizes: number[]): StreamSource & { reads: number } {
  let at = 0;
  let i = 0;
  return {
    reads: 0,
    async read(into) {
      this.reads++;
      const n = Math.min(into.length, sizes[i++ % sizes.length]!, data.length - at);
      into.set(data.subarray(at, at + n));
      at += n;
      return n;
    },
  };
}

/** The same bytes as chunks of the next of `sizes` (cycling), each a fresh copy as Node's streams give. */
export async function* oddChunks(data: Uint8Array, sizes: number[]): AsyncGenerator<Uint8Array> {
  for (let at = 0, i = 0; at < data.length; i++) {
    const n = Math.min(sizes[i % sizes.length]!, data.length - at);
    yield data.slice(at, at + n);
    at += n;
  }
}
