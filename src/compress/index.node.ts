/** Node: zlib's async API runs on libuv's thread pool, so several clusters compress in parallel. */
import { deflateRaw as deflateRawCb, inflateRaw as inflateRawCb, constants } from 'node:zlib';
import { promisify } from 'node:util';
import { corrupt } from '../core/errors.js';
import type { ClusterCodec } from './types.js';
import { zstdCompress, zstdDecompress } from './zstd.js';

const inflateP = promisify(inflateRawCb);
const deflateP = promisify(deflateRawCb);

export async function inflateRaw(data: Uint8Array, outSize: number): Promise<Uint8Array> {
  let out: Buffer;
  try {
    // Like QEMU: inflate into exactly one cluster; bytes after the stream's end are ignored and a
    // stream cut short by the output limit is fine (Z_BUF_ERROR).
    out = await inflateP(data, { maxOutputLength: outSize, finishFlush: constants.Z_SYNC_FLUSH });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ERR_BUFFER_TOO_LARGE') throw corrupt(`compressed cluster inflates to more than ${outSize} bytes`);
    throw corrupt(`bad deflate data in compressed cluster: ${(e as Error).message}`);
  }
  if (out.length !== outSize) throw corrupt(`compressed cluster inflated to ${out.length} bytes, expected ${outSize}`);
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

export async function deflateRaw(data: Uint8Array): Promise<Uint8Array> {
  const out = await deflateP(data, { level: 6, windowBits: 12, memLevel: 9 });
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

export { zstdCompress, zstdDecompress };

export const codec: ClusterCodec = { inflateRaw, deflateRaw, zstdCompress, zstdDecompress };
