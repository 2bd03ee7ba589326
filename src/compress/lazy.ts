/**
 * The cluster codecs (`#compress`), loaded on first use. The node codecs bring node:zlib, the
 * worker pool and the zstd wasm loader with them; images that never meet a compressed cluster
 * (most commands on most images) should not pay for loading them at start-up.
 */
type Codecs = typeof import('#compress');

let loaded: Codecs | undefined;
let loading: Promise<Codecs> | undefined;
const load = (): Promise<Codecs> =>
  (loading ??= import('#compress').then((m) => {
    loaded = m;
    return m;
  }));

export const inflateRaw = (data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> =>
  loaded ? loaded.inflateRaw(data, outSize, into) : load().then((m) => m.inflateRaw(data, outSize, into));
export const deflateRaw = (data: Uint8Array): Promise<Uint8Array> => (loaded ? loaded.deflateRaw(data) : load().then((m) => m.deflateRaw(data)));
export const zstdDecompress = (data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> =>
  loaded ? loaded.zstdDecompress(data, outSize, into) : load().then((m) => m.zstdDecompress(data, outSize, into));
export const zstdCompress = (data: Uint8Array): Promise<Uint8Array> => (loaded ? loaded.zstdCompress(data) : load().then((m) => m.zstdCompress(data)));
