/**
 * Cluster compression as the QCOW formats use it. Every function works on one cluster:
 * decompressors stop once `outSize` bytes are produced and accept trailing bytes after the
 * stream (the next compressed cluster may start there); they fail with QCOW_CORRUPT when the
 * stream yields fewer bytes.
 */
export interface ClusterCodec {
  /**
   * Raw deflate (no zlib header), as qcow v1 and qcow2 compression type 0 store it. With `into`
   * (exactly `outSize` bytes) the cluster is decompressed there and `into` is returned: a reader
   * filling a whole cluster of its buffer saves allocating (and first touching) one per cluster.
   * On failure `into` holds unspecified bytes.
   */
  inflateRaw(data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array>;
  /** Raw deflate with QEMU's parameters (level 6, 4 KiB window, memLevel 9). */
  deflateRaw(data: Uint8Array): Promise<Uint8Array>;
  /** One zstd frame (qcow2 compression type 1). */
  zstdDecompress(data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array>;
  zstdCompress(data: Uint8Array): Promise<Uint8Array>;
}

/** A kind of cluster codec job, for expectCodecJobs. */
export type CodecJobKind = 'inflate' | 'deflate' | 'zstd-decompress' | 'zstd-compress';
