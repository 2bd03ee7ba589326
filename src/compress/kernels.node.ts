/**
 * The synchronous cluster codecs on Node, shared by the main thread (small jobs) and the codec
 * workers (pool.node.ts). Each call does one cluster with QEMU's parameters and the contract of
 * types.ts: inflate exactly `outSize` bytes, ignore what follows the stream, QCOW_CORRUPT otherwise.
 */
import { constants, deflateRawSync, inflateRawSync } from 'node:zlib';
import { corrupt } from '../core/errors.js';
import { setFlagsFromString } from 'node:v8';
import { zstdCompressLoaded, zstdDecompressLoaded, zstdReady } from './zstd.js';

/**
 * zstd's WebAssembly module, made ready for this process. V8 first compiles it with its baseline
 * compiler and re-compiles a function with its optimising one once it has run "hot" enough (the
 * tiering budget); for the 250 KB zstd module that re-compilation took ~110 ms of CPU on a
 * background thread, which the main thread then waited for before exiting (Node drains background
 * tasks when the event loop empties): a 3 MiB zstd image took 230 ms to convert against 127 ms
 * for the same image in zlib. A budget 50 times V8's default (1.8 M) leaves short jobs on the
 * baseline code and still optimises long ones (512 MiB decoded: no slower within noise). The flag
 * is process-wide and read when a module is compiled, so it is set before the first one.
 */
let tuned = false;
export function zstdReadyHere(): Promise<void> {
  if (!tuned) {
    tuned = true;
    try {
      setFlagsFromString('--wasm-tiering-budget=90000000');
    } catch {
      // An engine without the flag: default tiering.
    }
  }
  return zstdReady();
}

export type CodecOp = 'inflate' | 'deflate' | 'zstd-decompress' | 'zstd-compress';

export function inflateRawNow(data: Uint8Array, outSize: number): Uint8Array {
  let out: Buffer;
  try {
    // Like QEMU: inflate into exactly one cluster; a stream cut short by the output limit is fine
    // (Z_SYNC_FLUSH, no Z_BUF_ERROR). One output chunk of the cluster's size: no concatenation.
    out = inflateRawSync(data, { maxOutputLength: outSize, finishFlush: constants.Z_SYNC_FLUSH, chunkSize: Math.max(64, outSize) });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ERR_BUFFER_TOO_LARGE') throw corrupt(`compressed cluster inflates to more than ${outSize} bytes`);
    throw corrupt(`bad deflate data in compressed cluster: ${(e as Error).message}`);
  }
  if (out.length !== outSize) throw corrupt(`compressed cluster inflated to ${out.length} bytes, expected ${outSize}`);
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

export function deflateRawNow(data: Uint8Array): Uint8Array {
  // QEMU's parameters: level 6, 4 KiB window (windowBits -12), memLevel 9.
  const out = deflateRawSync(data, { level: 6, windowBits: 12, memLevel: 9 });
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/** Run one job now, on this thread (zstd must be loaded first: see zstdReady in zstd.ts). */
export function runNow(op: CodecOp, data: Uint8Array, outSize: number): Uint8Array {
  switch (op) {
    case 'inflate':
      return inflateRawNow(data, outSize);
    case 'deflate':
      return deflateRawNow(data);
    case 'zstd-decompress':
      return zstdDecompressLoaded(data, outSize);
    case 'zstd-compress':
      return zstdCompressLoaded(data);
  }
}
