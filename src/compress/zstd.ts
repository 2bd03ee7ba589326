/**
 * zstd through WebAssembly (works in Node 20, which has no zstd in node:zlib, and in browsers).
 * The module is initialised once, on first use. On Node, clusters are decoded through the
 * system's libzstd instead when the host addon has it (kernels.node.ts): this module then only
 * compresses, since libzstd 1.5.4's frames at level 3 are not always the bytes of this package's
 * (a 2 KiB JavaScript text differed from byte 11 on; random, zero and repetitive clusters matched).
 */
import { corrupt } from '../core/errors.js';

type ZstdWasm = typeof import('@bokuweb/zstd-wasm');
/** The package, once loaded: it is imported on first use, not at start-up (~12 ms of loading). */
let wasm: ZstdWasm | undefined;
let ready: Promise<void> | undefined;
/** Resolves once the WebAssembly module is ready; the *Loaded functions need it. */
export const zstdReady = () =>
  (ready ??= import('@bokuweb/zstd-wasm').then(async (m) => {
    await m.init();
    wasm = m;
  }));

function loaded(): ZstdWasm {
  if (!wasm) throw new Error('zstd used before zstdReady() resolved');
  return wasm;
}

export async function zstdDecompress(data: Uint8Array, outSize: number): Promise<Uint8Array> {
  await zstdReady();
  return zstdDecompressLoaded(data, outSize);
}

export async function zstdCompress(data: Uint8Array): Promise<Uint8Array> {
  await zstdReady();
  return zstdCompressLoaded(data);
}

/** One cluster's frame, decoded synchronously (after zstdReady()). */
export function zstdDecompressLoaded(data: Uint8Array, outSize: number): Uint8Array {
  const frame = firstFrame(data);
  let out: Uint8Array;
  try {
    out = loaded().decompress(frame);
  } catch (e) {
    throw corrupt(`bad zstd data in compressed cluster: ${(e as Error).message ?? e}`);
  }
  // Exactly one cluster, as QEMU requires (it fails a frame with more to give once the cluster is
  // full), and as libzstd decoding into the cluster's buffer does (kernels.node.ts).
  if (out.length > outSize) throw corrupt(`zstd cluster decompresses to more than ${outSize} bytes`);
  if (out.length < outSize) throw corrupt(`zstd cluster decompressed to ${out.length} bytes, expected ${outSize}`);
  return out;
}

/**
 * The first zstd frame of a compressed cluster's bytes (see frameOnly), after checking that they
 * start with zstd's magic number: every decoder (WebAssembly, libzstd) is given only this.
 */
export function firstFrame(data: Uint8Array): Uint8Array {
  if (data.length < 4 || data[0] !== 0x28 || data[1] !== 0xb5 || data[2] !== 0x2f || data[3] !== 0xfd) {
    throw corrupt('compressed cluster is not a zstd frame');
  }
  return frameOnly(data);
}

/**
 * One compression context for the life of the thread (each codec worker has its own). The
 * package's compress() makes and frees a context per call, and a level-3 context sets up ~1 MB of
 * match tables each time: 190-250 us per 64 KiB cluster of mixed text against 55-130 us with the
 * context kept (600 clusters, 3 rounds). compressUsingDict with an empty dictionary is the
 * package's way to pass a context: zstd takes a dictionary under 8 bytes as none, so the frames
 * are the same bytes compress() gives (compress.test.ts compares them).
 */
let cctx: number | undefined;
const NO_DICT = new Uint8Array(0);

/** QEMU's level (3), synchronously (after zstdReady()). */
export function zstdCompressLoaded(data: Uint8Array): Uint8Array {
  const w = loaded();
  cctx ??= w.createCCtx();
  return w.compressUsingDict(cctx, data, NO_DICT, 3);
}

/**
 * The bytes of the first zstd frame in `data`: the compressed cluster is followed by whatever
 * comes next in the file (often the next cluster's frame), which must not be decoded.
 */
export function frameOnly(data: Uint8Array): Uint8Array {
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let p = 4;
  const fhd = data[p++];
  if (fhd === undefined) throw corrupt('truncated zstd frame');
  const dictIdFlag = fhd & 3;
  const singleSegment = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const fcsFlag = fhd >> 6;
  if (!singleSegment) p += 1; // window descriptor
  p += [0, 1, 2, 4][dictIdFlag]!;
  p += fcsFlag === 0 ? (singleSegment ? 1 : 0) : [1, 2, 4, 8][fcsFlag]!;
  for (;;) {
    if (p + 3 > data.length) throw corrupt('truncated zstd frame');
    const hdr = data[p]! | (data[p + 1]! << 8) | (data[p + 2]! << 16);
    p += 3;
    const last = hdr & 1;
    const type = (hdr >> 1) & 3;
    const size = hdr >>> 3;
    if (type === 3) throw corrupt('reserved zstd block type');
    p += type === 1 ? 1 : size; // RLE blocks store one byte
    if (p > data.length) throw corrupt('truncated zstd frame');
    if (last) break;
  }
  if (checksum) p += 4;
  if (p > data.length) throw corrupt('truncated zstd frame');
  void dv;
  return data.subarray(0, p);
}
