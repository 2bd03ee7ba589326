/**
 * Compressed clusters: decompress one cluster's stream (zlib = raw deflate, or one zstd frame).
 * The stream is read up to the descriptor's bound, which may include the start of the next
 * compressed cluster; the decompressors stop after `clusterSize` bytes and ignore what follows.
 */
import { inflateRaw, zstdDecompress } from '../../compress/lazy.js';
import { QcowError, corrupt } from '../../core/errors.js';

export type CompressionKind = 'zlib' | 'zstd';

/** One cluster, decompressed into `into` (exactly one cluster) when given, else a new buffer. */
export async function decompressCluster(raw: Uint8Array, clusterSize: number, kind: CompressionKind, hostOffset: number, into?: Uint8Array): Promise<Uint8Array> {
  try {
    return kind === 'zstd' ? await zstdDecompress(raw, clusterSize, into) : await inflateRaw(raw, clusterSize, into);
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    if (e instanceof QcowError && e.code !== 'QCOW_CORRUPT') throw e;
    throw corrupt(`compressed cluster at host offset 0x${hostOffset.toString(16)} (${kind}): ${why}`);
  }
}
