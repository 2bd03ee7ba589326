/**
 * The cluster codecs (`#compress`), loaded on first use. The node codecs bring node:zlib, the
 * worker pool and the zstd wasm loader with them; images that never meet a compressed cluster
 * (most commands on most images) should not pay for loading them at start-up.
 */
import type { CodecJobKind } from './types.js';

type Codecs = typeof import('#compress');

let loaded: Codecs | undefined;
const pendingHints: [CodecJobKind, number, number][] = [];
let loading: Promise<Codecs> | undefined;
const load = (): Promise<Codecs> =>
  (loading ??= import('#compress').then((m) => {
    for (const h of pendingHints.splice(0)) m.expectCodecJobs(...h);
    loaded = m;
    return m;
  }));

export const inflateRaw = (data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> =>
  loaded ? loaded.inflateRaw(data, outSize, into) : load().then((m) => m.inflateRaw(data, outSize, into));
export const deflateRaw = (data: Uint8Array): Promise<Uint8Array> => (loaded ? loaded.deflateRaw(data) : load().then((m) => m.deflateRaw(data)));
export const zstdDecompress = (data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> =>
  loaded ? loaded.zstdDecompress(data, outSize, into) : load().then((m) => m.zstdDecompress(data, outSize, into));
export const zstdCompress = (data: Uint8Array): Promise<Uint8Array> => (loaded ? loaded.zstdCompress(data) : load().then((m) => m.zstdCompress(data)));

/**
 * A hint of the codec work ahead (see expectCodecJobs in index.node.ts). It loads nothing: before
 * the codecs are loaded it is kept, and given to them when the first cluster loads them.
 */
export function expectCodecJobs(kind: CodecJobKind, jobs: number, clusterSize: number): void {
  if (loaded) loaded.expectCodecJobs(kind, jobs, clusterSize);
  else pendingHints.push([kind, jobs, clusterSize]);
}
