/** Browser: fflate (pure JS) for deflate; zstd through WebAssembly as in Node. */
import { deflateSync, Inflate } from 'fflate';
import { corrupt } from '../core/errors.js';
import { copyInto } from './into.js';
import type { ClusterCodec, CodecJobKind } from './types.js';
import { zstdCompress, zstdDecompress as zstdDecompressNew } from './zstd.js';

export async function inflateRaw(data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
  if (into && into.length !== outSize) throw new RangeError(`a ${into.length}-byte buffer for a ${outSize}-byte cluster`);
  const out = into ?? new Uint8Array(outSize);
  let filled = 0;
  let overflow = false;
  const inf = new Inflate((chunk) => {
    const n = Math.min(chunk.length, outSize - filled);
    out.set(chunk.subarray(0, n), filled);
    filled += n;
    if (n < chunk.length) overflow = true;
  });
  try {
    inf.push(data, true);
  } catch (e) {
    // Trailing garbage after a complete stream is allowed (QEMU ignores it); a broken stream is not.
    if (filled < outSize) throw corrupt(`bad deflate data in compressed cluster: ${(e as Error).message}`);
  }
  if (overflow) throw corrupt(`compressed cluster inflates to more than ${outSize} bytes`);
  if (filled !== outSize) throw corrupt(`compressed cluster inflated to ${filled} bytes, expected ${outSize}`);
  return out;
}

export async function deflateRaw(data: Uint8Array): Promise<Uint8Array> {
  return deflateSync(data, { level: 6, mem: 9 });
}

export async function zstdDecompress(data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
  const out = await zstdDecompressNew(data, outSize);
  return into ? copyInto(into, out) : out;
}

export { zstdCompress };

/** Node's pool takes this as a hint (see index.node.ts); the browser codecs run where called. */
export function expectCodecJobs(_kind: CodecJobKind, _jobs: number, _clusterSize: number): void {}

export const codec: ClusterCodec = { inflateRaw, deflateRaw, zstdCompress, zstdDecompress };
