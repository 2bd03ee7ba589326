/**
 * The synchronous cluster codecs on Node, shared by the main thread (small jobs) and the codec
 * workers (pool.node.ts). Each call does one cluster with QEMU's parameters and the contract of
 * types.ts: inflate exactly `outSize` bytes, ignore what follows the stream, QCOW_CORRUPT otherwise.
 */
import { createDeflateRaw, createInflateRaw, deflateRawSync, inflateRawSync } from 'node:zlib';
import { corrupt } from '../core/errors.js';
import { setFlagsFromString } from 'node:v8';
import { copyInto } from './into.js';
import { firstFrame, zstdCompressLoaded, zstdDecompressLoaded, zstdReady } from './zstd.js';
import type { CodecJobKind } from './types.js';
import { hostAddon, type HostAddon } from '../host/native.node.js';

/** A decoder that writes one zstd frame into `into` and returns the bytes written (the host addon's). */
export type ZstdDecodeInto = (frame: Uint8Array, into: Uint8Array) => number;

/**
 * The system's libzstd through the host addon, when `addon` has it: not an addon built before
 * version 5 (no zstdDecompress: a stale build/ after an upgrade), not one that found no
 * libzstd.so.1. Otherwise null, and zstd decodes through WebAssembly as before.
 */
export function nativeZstdOf(addon: HostAddon | undefined): ZstdDecodeInto | null {
  if (!addon || typeof addon.zstdDecompress !== 'function' || typeof addon.zstdVersion !== 'function') return null;
  if (!(addon.zstdVersion() > 0)) return null;
  const decode = addon.zstdDecompress;
  return (frame, into) => decode.call(addon, frame, into);
}

let nativeZstd: ZstdDecodeInto | null | undefined;
/** This process's libzstd decoder (see nativeZstdOf), looked up once per thread. */
export function nativeZstdHere(): ZstdDecodeInto | null {
  return (nativeZstd ??= nativeZstdOf(hostAddon()));
}

/**
 * One zstd cluster through `decode` (libzstd): the same contract as zstdDecompressLoaded, the
 * WebAssembly path, but decoded straight into `into` (or one new buffer): no copy of the cluster,
 * and no WebAssembly module to compile (~7 ms) and first touch (~460 page faults). Only the first
 * frame is decoded (firstFrame: libzstd would go on into the next cluster's frame), and it must
 * give exactly `outSize` bytes, as QEMU requires: libzstd refuses a frame larger than `into`.
 */
export function zstdDecompressWith(decode: ZstdDecodeInto, data: Uint8Array, outSize: number, into?: Uint8Array): Uint8Array {
  if (into && into.length !== outSize) throw new RangeError(`zstd target of ${into.length} bytes for a ${outSize}-byte cluster`);
  const frame = firstFrame(data);
  const out = into ?? new Uint8Array(outSize);
  let n: number;
  try {
    n = decode(frame, out);
  } catch (e) {
    throw corrupt(`bad zstd data in compressed cluster: ${(e as Error).message ?? e}`);
  }
  if (n !== outSize) throw corrupt(`zstd cluster decompressed to ${n} bytes, expected ${outSize}`);
  return out;
}

/**
 * zlib through the host addon: the zlib node:zlib itself runs (the one Node is built with, whose
 * functions the addon finds by name; see native/qcow_host.c), called directly. Loading node:zlib
 * (with node:stream) and making its stream cost a small convert ~4 ms before the first cluster;
 * these calls cost nothing until used. Same library, same parameters, same calls (one state per
 * thread, reset per cluster): the same bytes out. Inflating passes Z_FINISH, not node:zlib's
 * Z_SYNC_FLUSH: same bytes, without the window copy after each cluster (see native/qcow_host.c).
 */
export interface NativeZlib {
  /** Inflate into `into`: the bytes written, or into.length + 1 when the stream has more. */
  inflate(data: Uint8Array, into: Uint8Array): number;
  /** Deflate `data` with QEMU's parameters into `out`: the bytes written, or -1 when `out` is too small. */
  deflate(data: Uint8Array, out: Uint8Array): number;
}

/**
 * The addon's zlib, when `addon` has it (version 6 on) and it is the zlib node:zlib uses: its
 * zlibVersion() is the version in process.versions.zlib (which may carry a build suffix,
 * "1.3.1-e00f703"). Otherwise null, and node:zlib does the work as before.
 */
export function nativeZlibOf(addon: HostAddon | undefined, nodeZlibVersion: string | undefined = process.versions.zlib): NativeZlib | null {
  if (!addon || typeof addon.inflateRaw !== 'function' || typeof addon.deflateRaw !== 'function' || typeof addon.zlibVersion !== 'function') return null;
  const version = addon.zlibVersion();
  if (!version || !nodeZlibVersion || (nodeZlibVersion !== version && !nodeZlibVersion.startsWith(`${version}-`))) return null;
  const { inflateRaw, deflateRaw } = addon;
  return {
    inflate: (data, into) => inflateRaw.call(addon, data, into, INFLATE_WINDOW_BITS),
    deflate: (data, out) => deflateRaw.call(addon, data, out, DEFLATE_OPTIONS.level, DEFLATE_OPTIONS.windowBits, DEFLATE_OPTIONS.memLevel),
  };
}

let nativeZlib: NativeZlib | null | undefined;
/** This process's addon zlib (see nativeZlibOf), looked up once per thread. */
export function nativeZlibHere(): NativeZlib | null {
  return (nativeZlib ??= nativeZlibOf(hostAddon()));
}

/**
 * Which code compresses and decompresses clusters in this process, for `qcow --version`: the
 * host addon's zlib and libzstd where they are usable, else node:zlib and WebAssembly.
 */
export function codecKinds(): string {
  const addon = hostAddon();
  const zlib = nativeZlibHere() ? `zlib ${addon!.zlibVersion!()} through the host addon` : `node:zlib (zlib ${process.versions.zlib})`;
  const zstd = nativeZstdHere();
  const v = zstd ? addon!.zstdVersion!() : 0;
  const zstdDecode = zstd ? `libzstd ${Math.floor(v / 10000)}.${Math.floor(v / 100) % 100}.${v % 100}` : 'WebAssembly';
  return `${zlib}; zstd: ${zstdDecode} decoding, WebAssembly encoding`;
}

/** One cluster inflated through `z`: inflateRawNow's contract (see there). */
export function inflateRawWith(z: NativeZlib, data: Uint8Array, outSize: number, into?: Uint8Array): Uint8Array {
  if (into && into.length !== outSize) throw new RangeError(`inflate target of ${into.length} bytes for a ${outSize}-byte cluster`);
  const out = into ?? new Uint8Array(outSize);
  let n: number;
  try {
    n = z.inflate(data, out);
  } catch (e) {
    throw corrupt(`bad deflate data in compressed cluster: ${(e as Error).message ?? e}`);
  }
  if (n > outSize) throw corrupt(`compressed cluster inflates to more than ${outSize} bytes`);
  if (n !== outSize) throw corrupt(`compressed cluster inflated to ${n} bytes, expected ${outSize}`);
  return out;
}

/** The output buffer of deflateRawWith, kept for the thread's life (grown when a larger input comes). */
let deflateOut: Uint8Array | undefined;

/**
 * One cluster deflated through `z`, or null when it did not fit its buffer (then node:zlib does it).
 * Output no shorter than the input is returned as a view of the thread's buffer, valid only until
 * the next call: every user stores such a cluster uncompressed and looks at no more than its
 * length (qcow2 and qcow writers, the stream writer; a codec worker copies views before sending
 * them). Copying it out cost a fresh buffer per incompressible cluster: 24 of the 48 clusters of
 * a 3 MiB `convert -c` of half random data, ~390 page faults.
 */
export function deflateRawWith(z: NativeZlib, data: Uint8Array): Uint8Array | null {
  const need = deflateBound(data.length);
  if (!deflateOut || deflateOut.length < need) deflateOut = new Uint8Array(need);
  const n = z.deflate(data, deflateOut);
  if (n < 0) return null;
  return n >= data.length ? deflateOut.subarray(0, n) : deflateOut.slice(0, n);
}

/** Whether `op` needs the WebAssembly zstd module here: compression always, decoding only without libzstd. */
export function needsZstdWasm(op: CodecJobKind): boolean {
  return op === 'zstd-compress' || (op === 'zstd-decompress' && nativeZstdHere() === null);
}

/** zstd decoding on this thread, through libzstd when it is there, else WebAssembly (zstdReadyHere() first). */
export function zstdDecompressNow(data: Uint8Array, outSize: number, into?: Uint8Array): Uint8Array {
  const decode = nativeZstdHere();
  if (decode) return zstdDecompressWith(decode, data, outSize, into);
  return into ? copyInto(into, zstdDecompressLoaded(data, outSize)) : zstdDecompressLoaded(data, outSize);
}

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

export type CodecOp = CodecJobKind;

/**
 * zlib's flush modes (zlib.h; part of its ABI, the same in every zlib). Not node:zlib's
 * `constants`: only functions of node:zlib and node:v8 are imported here, so that the CLI's
 * bundles can load each module on its first call (scripts/build-cli.mjs, LAZY_BUILTINS): a zstd
 * image never loads node:zlib (with node:stream, ~5 ms), a zlib one never loads node:v8 (~4 ms).
 */
const Z_SYNC_FLUSH = 2;
const Z_FINISH = 4;

/**
 * Inflate with one zlib state for the life of the thread, as deflateRawNow deflates (see
 * ZlibHandle below): inflateRawSync makes a stream, its state and its output buffer per call,
 * which cost a 64 KiB cluster ~75 us of CPU where the inflate itself takes ~25 (measured:
 * 5000 clusters of mixed data). The handle reports a zlib error through its `onerror`, called
 * during writeSync; we take that slot, so a bad stream leaves the stream object alone and the
 * state is simply reset for the next cluster.
 */
interface Inflater {
  handle: ZlibHandle & { onerror: (message: string, errno: number) => void };
  state: Uint32Array;
  /** zlib's message for the last failed call, set by the handle's onerror. */
  error: string | null;
  stream: object;
}
let inflater: Inflater | null | undefined;
/** One byte of output room: a stream that still has bytes to give after filling the cluster is too long. */
const overflowProbe = new Uint8Array(1);

function makeInflater(): Inflater | null {
  try {
    const stream = createInflateRaw({ finishFlush: Z_SYNC_FLUSH }) as unknown as { _handle?: Inflater['handle']; _writeState?: Uint32Array };
    const handle = stream._handle;
    const state = stream._writeState;
    if (!handle || typeof handle.writeSync !== 'function' || typeof handle.reset !== 'function' || !(state instanceof Uint32Array)) return null;
    const z: Inflater = { handle, state, error: null, stream };
    handle.onerror = (message) => {
      z.error = message;
    };
    return z;
  } catch {
    return null;
  }
}

/** One call on the reused state; false when the handle did something unexpected (then never again). */
function inflateStep(z: Inflater, data: Uint8Array, inOff: number, out: Uint8Array): boolean {
  z.error = null;
  z.state[0] = 0;
  z.state[1] = 0;
  z.handle.writeSync(Z_SYNC_FLUSH, data, inOff, data.length - inOff, out, 0, out.length);
  if (z.error) throw corrupt(`bad deflate data in compressed cluster: ${z.error}`);
  return z.state[0]! <= out.length && z.state[1]! <= data.length - inOff;
}

/**
 * Inflate one cluster. `into`, when given, is where the cluster goes (exactly `outSize` bytes): a
 * codec worker fills a buffer the main thread allocated, whose pages are already mapped there.
 */
export function inflateRawNow(data: Uint8Array, outSize: number, into?: Uint8Array): Uint8Array {
  const z = nativeZlibHere();
  return z ? inflateRawWith(z, data, outSize, into) : inflateRawNode(data, outSize, into);
}

/** inflateRawNow through node:zlib (no host addon, or not with node:zlib's zlib). */
export function inflateRawNode(data: Uint8Array, outSize: number, into?: Uint8Array): Uint8Array {
  if (into && into.length !== outSize) throw new RangeError(`inflate target of ${into.length} bytes for a ${outSize}-byte cluster`);
  if (inflater === undefined) inflater = makeInflater();
  const z = inflater;
  if (z) {
    z.handle.reset();
    // Like QEMU: inflate into exactly one cluster, and ignore what follows the stream.
    const out = into ?? new Uint8Array(outSize);
    if (inflateStep(z, data, 0, out)) {
      const filled = outSize - z.state[0]!;
      if (filled !== outSize) throw corrupt(`compressed cluster inflated to ${filled} bytes, expected ${outSize}`);
      if (inflateStep(z, data, data.length - z.state[1]!, overflowProbe)) {
        if (z.state[0] === 0) throw corrupt(`compressed cluster inflates to more than ${outSize} bytes`);
        return out;
      }
    }
    inflater = null;
  }
  return into ? copyInto(into, inflateRawSyncChecked(data, outSize)) : inflateRawSyncChecked(data, outSize);
}

/** inflateRawNow through node:zlib's public API: a new stream per call. */
function inflateRawSyncChecked(data: Uint8Array, outSize: number): Uint8Array {
  let out: Buffer;
  try {
    // Like QEMU: inflate into exactly one cluster; a stream cut short by the output limit is fine
    // (Z_SYNC_FLUSH, no Z_BUF_ERROR). One output chunk of the cluster's size: no concatenation.
    out = inflateRawSync(data, { maxOutputLength: outSize, finishFlush: Z_SYNC_FLUSH, chunkSize: Math.max(64, outSize) });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ERR_BUFFER_TOO_LARGE') throw corrupt(`compressed cluster inflates to more than ${outSize} bytes`);
    throw corrupt(`bad deflate data in compressed cluster: ${(e as Error).message}`);
  }
  if (out.length !== outSize) throw corrupt(`compressed cluster inflated to ${out.length} bytes, expected ${outSize}`);
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/**
 * The window node:zlib's createInflateRaw() opens with (its default, 15: 32 KiB), which accepts
 * every stream QEMU's 4 KiB window does and more; the addon path inflates with the same.
 */
const INFLATE_WINDOW_BITS = 15;

/** QEMU's parameters: level 6, 4 KiB window (windowBits -12: QEMU inflates with it), memLevel 9. */
const DEFLATE_OPTIONS = { level: 6, windowBits: 12, memLevel: 9 } as const;

/**
 * The part of a node:zlib stream's native handle used to deflate whole buffers with one zlib
 * state for the life of the thread. `deflateRawSync` makes a new stream per call: deflateInit2
 * allocates ~270 KiB of state (memLevel 9), all of it fresh pages, and the per-call set-up made a
 * 64 KiB cluster cost ~25% more CPU than a reused state (measured: 32 MiB of mixed clusters,
 * 430 -> 315 ms; 23.5k -> 16.8k page faults). node:zlib has no public reset-able synchronous
 * API, so this leans on the handle its own sync functions use (`writeSync`, `reset`, and the
 * `_writeState` pair [avail_out, avail_in]), present since Node 10; where it is missing or
 * behaves unexpectedly, deflateRawNow falls back to deflateRawSync for good.
 */
interface ZlibHandle {
  writeSync(flush: number, input: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void;
  reset(): void;
}
interface Deflater {
  handle: ZlibHandle;
  state: Uint32Array;
  out: Uint8Array;
  /** The stream object, kept so its handle is not collected (and for its error slot). */
  stream: object;
}
let deflater: Deflater | null | undefined;

function makeDeflater(outSize: number): Deflater | null {
  try {
    const stream = createDeflateRaw(DEFLATE_OPTIONS) as unknown as { _handle?: ZlibHandle; _writeState?: Uint32Array; on(ev: 'error', fn: () => void): void };
    // A zlib error would be emitted on the stream later; the state check below handles it here.
    stream.on('error', () => undefined);
    const handle = stream._handle;
    const state = stream._writeState;
    if (!handle || typeof handle.writeSync !== 'function' || typeof handle.reset !== 'function' || !(state instanceof Uint32Array)) return null;
    return { handle, state, out: new Uint8Array(outSize), stream };
  } catch {
    return null;
  }
}

/** Room for any deflate output of `n` bytes (zlib's deflateBound with margin). */
const deflateBound = (n: number): number => n + (n >>> 3) + 1024;

export function deflateRawNow(data: Uint8Array): Uint8Array {
  const z = nativeZlibHere();
  return (z && deflateRawWith(z, data)) || deflateRawNode(data);
}

/** deflateRawNow through node:zlib (no host addon, or not with node:zlib's zlib). */
export function deflateRawNode(data: Uint8Array): Uint8Array {
  if (deflater !== null) {
    const need = deflateBound(data.length);
    if (deflater === undefined || deflater.out.length < need) deflater = makeDeflater(need);
    else deflater.handle.reset();
    const d = deflater;
    if (d) {
      d.state[0] = 0;
      d.state[1] = 0;
      d.handle.writeSync(Z_FINISH, data, 0, data.length, d.out, 0, d.out.length);
      const availOut = d.state[0]!;
      const availIn = d.state[1]!;
      // Z_FINISH with input consumed and room left over means the stream ended in the buffer.
      if (availIn === 0 && availOut > 0 && availOut <= d.out.length) return d.out.slice(0, d.out.length - availOut);
      deflater = null;
    }
  }
  const out = deflateRawSync(data, DEFLATE_OPTIONS);
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/**
 * Run one job now, on this thread (zstd's WebAssembly must be ready first where needsZstdWasm says so). `into`:
 * where an inflated cluster goes (see inflateRawNow); the other codecs allocate their result.
 */
export function runNow(op: CodecOp, data: Uint8Array, outSize: number, into?: Uint8Array): Uint8Array {
  switch (op) {
    case 'inflate':
      return inflateRawNow(data, outSize, into);
    case 'deflate':
      return deflateRawNow(data);
    case 'zstd-decompress':
      return zstdDecompressNow(data, outSize, into);
    case 'zstd-compress':
      return zstdCompressLoaded(data);
  }
}
