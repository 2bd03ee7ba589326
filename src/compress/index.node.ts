/**
 * Node: cluster codecs with a cheap path for cheap jobs and a worker pool for the rest.
 *
 * Inflating a cluster costs about what its compressed input weighs: a 300-byte stream (text,
 * mostly-zero clusters) inflates in ~45 µs, less than a hand-off to another thread costs, so small
 * inputs are done on the spot; larger ones, and every deflate (300-900 µs per 64 KiB), go to the
 * worker pool (pool.node.ts), which runs several at once as QEMU's 4-thread pool does. zstd
 * clusters are decoded through the system's libzstd where the host addon has it, WebAssembly
 * otherwise (kernels.node.ts).
 */
import type { ClusterCodec, CodecJobKind } from './types.js';
import { codecPool } from './pool.node.js';
import { inflateRawNow, deflateRawNow, needsZstdWasm, zstdDecompressNow, zstdReadyHere } from './kernels.node.js';

/** Compressed inputs up to this size are decompressed on the calling thread. */
const INLINE_INPUT_MAX = 4096;
/** Clusters up to this size are compressed on the calling thread. */
const INLINE_DEFLATE_MAX = 4096;

export async function inflateRaw(data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
  if (data.length <= INLINE_INPUT_MAX) {
    codecPool.doneElsewhere('inflate', data.length, outSize);
    return inflateRawNow(data, outSize, into);
  }
  return codecPool.run('inflate', data, outSize, into);
}

export async function deflateRaw(data: Uint8Array): Promise<Uint8Array> {
  if (data.length <= INLINE_DEFLATE_MAX) {
    codecPool.doneElsewhere('deflate', data.length, data.length);
    return deflateRawNow(data);
  }
  return codecPool.run('deflate', data, 0);
}

export async function zstdDecompress(data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
  if (data.length <= INLINE_INPUT_MAX) {
    codecPool.doneElsewhere('zstd-decompress', data.length, outSize);
    if (needsZstdWasm('zstd-decompress')) await zstdReadyHere();
    return zstdDecompressNow(data, outSize, into);
  }
  return codecPool.run('zstd-decompress', data, outSize, into);
}

export async function zstdCompress(data: Uint8Array): Promise<Uint8Array> {
  return codecPool.run('zstd-compress', data, 0);
}

/**
 * Say that about `jobs` more clusters of `clusterSize` bytes will go through `kind` (convert knows
 * it from the source's map): the pool then starts worker threads only if that much work pays for
 * them (see pool.node.ts), instead of guessing from the work done so far. Only clusters whose
 * compressed form is over the inline limit above reach the pool; the others are counted off as
 * they are done here. Each call adds to the last.
 */
export function expectCodecJobs(kind: CodecJobKind, jobs: number, clusterSize: number): void {
  codecPool.expect(kind, jobs, clusterSize);
}

export const codec: ClusterCodec = { inflateRaw, deflateRaw, zstdCompress, zstdDecompress };
