/**
 * Convert an image arriving as a stream (standard input, an HTTP body from a server without
 * Range support, a Node Readable or a web ReadableStream) into a seekable target, in one pass.
 * qcow2 is read by read-qcow2.ts; raw is copied as it comes, its zero blocks left unwritten in a
 * fresh target. Afterwards, what the streamed image leaves to its backing file is copied from that
 * file (opened as usual: it is not part of the stream), and in an existing target (-n) what it
 * leaves unallocated is zeroed.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { QCOW2_MAGIC } from '../formats/qcow2/header.js';
import { readQcow2Stream, type StreamImageInfo } from './read-qcow2.js';
import { readQcow1Stream } from './read-qcow1.js';
import type { Spill } from './spill.js';
import { ClusterReader, type StreamSource } from './cluster-reader.js';
import type { ByteStore } from '../storage/types.js';
import { rawFormat } from '../formats/raw/raw.js';

/** Options of {@link readImageStream}: the stream's format, the target, and the memory it may hold. */
export interface ReadStreamOptions {
  /** 'qcow2', 'qcow' or 'raw'; default: from the stream's magic and version, else raw. */
  format?: string;
  /** A raw stream's length, when known (a file, Content-Length): raw has no header to say it. */
  size?: number;
  /** The target reads as zeros everywhere (a fresh image without backing): zeros need no writes. */
  targetIsZero: boolean;
  /** Opens the backing file a streamed image names. */
  openBacking?: (name: string, format: string | undefined) => Promise<BlockDevice>;
  /** Bytes of clusters held until the tables that name them arrive (qcow2). Default 64 MiB. */
  bufferBytes?: number;
  /** The password of an encrypted qcow2 image. */
  password?: string;
  /**
   * A raw stream of unknown length (a pipe): the empty store of a new raw target, which grows with
   * the stream. Without it such a stream is refused (there is no size to create a target with).
   */
  growingRawTarget?: () => Promise<ByteStore>;
  /**
   * A raw stream of unknown length into another format: a new, empty image that can be resized
   * (qcow2). It grows ahead of the stream and is cut to the stream's length (rounded up to 512
   * bytes, as image sizes are) at its end.
   */
  growingTarget?: () => Promise<BlockDevice>;
  /** qcow2 and qcow: where held clusters go past `bufferBytes` of memory, and how much it may take. */
  spill?: {
    /** Where held clusters go once `bufferBytes` is full ({@link memorySpill}, or `fileSpill` of `qcow/node`). */
    store: Spill;
    /** Most bytes the spill may hold; past it the stream is refused with a line saying what to allow. */
    limit: number;
  };
  /** Stops the operation between chunks; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
  /** Bytes of the stream consumed so far. */
  onProgress?: (bytesIn: number) => void;
}

/** What {@link readImageStream} did, and the target it wrote. */
export interface ReadStreamResult {
  /** The stream's format ("qcow2", "qcow", "raw"), as given or as found from its magic. */
  format: string;
  /** Bytes of the stream consumed. */
  bytesIn: number;
  /** The most bytes held at once while waiting for their tables (qcow2). */
  peakBuffered: number;
  /** The target device, written and still open: flush and close it. */
  target: BlockDevice;
}

/** A web ReadableStream as the async iterable the readers take (Node streams already are one). */
export async function* webStreamChunks(stream: ReadableStream<Uint8Array>): AsyncGenerator<Uint8Array> {
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      yield value;
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * Convert the image on `chunks` into the device `openTarget` gives for it (made from the size the
 * header tells; for raw, `options.size`). `chunks` is an async iterable of chunks (a Node Readable,
 * {@link webStreamChunks} of a web stream), or a {@link StreamSource} that reads into memory the
 * reader reuses (`fdSource` of `qcow/node` for a pipe: no buffer allocated per read).
 *
 * @example
 * ```ts
 * import { createImage, openImage, readImageStream } from 'qcow/node';
 *
 * // qemu-img convert from standard input: curl https://example.com/disk.qcow2 | node this.js
 * const { target, format } = await readImageStream(
 *   process.stdin,
 *   async ({ size }) => {
 *     await createImage('disk.qcow2', { format: 'qcow2', size });
 *     return openImage('disk.qcow2', { format: 'qcow2' });
 *   },
 *   { targetIsZero: true },
 * );
 * await target.close();
 * ```
 */
export async function readImageStream(
  chunks: AsyncIterable<Uint8Array> | StreamSource,
  openTarget: (info: { format: string; size: number; backingFile?: string; backingFormat?: string }) => Promise<BlockDevice>,
  options: ReadStreamOptions,
): Promise<ReadStreamResult> {
  const reader = new ClusterReader(chunks, { signal: options.signal });
  const head8 = await reader.peek(8);
  const magic = head8.length >= 8 && new DataView(head8.buffer, head8.byteOffset).getUint32(0) === QCOW2_MAGIC;
  const version = magic ? new DataView(head8.buffer, head8.byteOffset).getUint32(4) : 0;
  const isQcow2 = magic && version >= 2;
  const format = options.format ?? (isQcow2 ? 'qcow2' : magic && version === 1 ? 'qcow' : 'raw');
  if (format === 'qcow') {
    if (!magic || version !== 1) throw new QcowError('QCOW_BAD_MAGIC', 'the stream is not a qcow (v1) image');
    let streamInfo: StreamImageInfo | undefined;
    const r = await readQcow1Stream(
      reader,
      async (info) => {
        streamInfo = info;
        return openTarget(info);
      },
      { bufferBytes: options.bufferBytes, password: options.password, spill: options.spill, signal: options.signal, onProgress: options.onProgress },
    );
    await fillUndecided(r.target, streamInfo!, r.decided, options);
    return { format, bytesIn: r.bytesIn, peakBuffered: r.peakBuffered, target: r.target };
  }
  if (format === 'qcow2') {
    if (!isQcow2) throw new QcowError('QCOW_BAD_MAGIC', head8.length < 8 ? 'the stream is empty, not a qcow2 image' : 'the stream is not a qcow2 image (bad magic)');
    let streamInfo: StreamImageInfo | undefined;
    const r = await readQcow2Stream(
      reader,
      async (info) => {
        streamInfo = info;
        if (info.extendedL2 && !options.targetIsZero) throw new QcowError('QCOW_UNSUPPORTED', 'an image with extended L2 entries can be read from a stream only into a new target (not -n or with -B)');
        return openTarget(info);
      },
      { bufferBytes: options.bufferBytes, password: options.password, spill: options.spill, signal: options.signal, onProgress: options.onProgress },
    );
    await fillUndecided(r.target, streamInfo!, r.decided, options);
    return { format, bytesIn: r.bytesIn, peakBuffered: r.peakBuffered, target: r.target };
  }
  if (format !== 'raw') throw new QcowError('QCOW_UNSUPPORTED', `a stream can be read as qcow2, qcow or raw, not ${format}`);
  if (options.size === undefined) {
    if (options.growingRawTarget) {
      // A new raw file takes the stream as it comes and ends where it ends.
      const store = await options.growingRawTarget();
      const bytesIn = await copyRawGrowing(reader.pieces(), store, options);
      return { format, bytesIn, peakBuffered: 0, target: await rawFormat.open(store) };
    }
    if (options.growingTarget) {
      const target = await options.growingTarget();
      const bytesIn = await copyRawIntoGrowingImage(reader.pieces(), target, options);
      return { format, bytesIn, peakBuffered: 0, target };
    }
    throw new QcowError('QCOW_UNSUPPORTED', 'a raw stream does not say how large it is: stream it into a new image without a backing file, or from a file or a server that sends Content-Length');
  }
  const target = await openTarget({ format: 'raw', size: options.size });
  const bytesIn = await copyRaw(reader.pieces(), target, options);
  return { format, bytesIn, peakBuffered: 0, target };
}

/** Raw bytes of unknown length into an empty store: zero 4 KiB blocks are left as holes, the length set at the end. */
async function copyRawGrowing(chunks: AsyncIterable<Uint8Array>, store: ByteStore, options: ReadStreamOptions): Promise<number> {
  const BLOCK = 4096;
  let at = 0;
  for await (const chunk of chunks) {
    throwIfAborted(options.signal);
    // Runs of non-zero blocks are written whole; a block is looked at from its own offset.
    for (let i = 0; i < chunk.length; ) {
      const blockEnd = Math.min(chunk.length, i + BLOCK - ((at + i) % BLOCK));
      if (isZero(chunk.subarray(i, blockEnd))) {
        i = blockEnd;
        continue;
      }
      let end = blockEnd;
      while (end < chunk.length) {
        const next = Math.min(chunk.length, end + BLOCK);
        if (isZero(chunk.subarray(end, next))) break;
        end = next;
      }
      await store.write(at + i, chunk.subarray(i, end));
      i = end;
    }
    at += chunk.length;
    options.onProgress?.(at);
  }
  await store.truncate(at);
  return at;
}

/**
 * Raw bytes of unknown length into a new, empty image that grows ahead of them. The stream's
 * pieces (a pipe gives 64 KiB or less, at any offset) are gathered into whole-cluster runs first,
 * so each cluster is written once, whole, and all-zero clusters not at all.
 */
async function copyRawIntoGrowingImage(chunks: AsyncIterable<Uint8Array>, target: BlockDevice, options: ReadStreamOptions): Promise<number> {
  if (!target.resize) throw new QcowError('QCOW_UNSUPPORTED', `a raw stream of unknown length cannot be read into ${target.format}: its images cannot grow`);
  const cs = Math.max(512, target.clusterSize);
  const run = new Uint8Array(Math.max(cs, 2 ** 21 - (2 ** 21 % cs)));
  let filled = 0; // bytes of `run` holding the stream from `runAt`
  let runAt = 0;
  const writeRun = async (length: number) => {
    const needed = runAt + length;
    if (needed > target.size) {
      // Grow in steps of an eighth (at least 64 MiB): a few resizes, not one per piece.
      const step = Math.max(64 * 2 ** 20, Math.ceil(target.size / 8));
      await target.resize!(Math.ceil(Math.max(needed, target.size + step) / cs) * cs);
    }
    for (let i = 0; i < length; ) {
      const end = Math.min(length, i + cs);
      if (isZero(run.subarray(i, end))) {
        i = end;
        continue;
      }
      let stop = end;
      while (stop < length && !isZero(run.subarray(stop, Math.min(length, stop + cs)))) stop = Math.min(length, stop + cs);
      await target.write(runAt + i, run.subarray(i, stop));
      i = stop;
    }
  };
  let at = 0;
  for await (const chunk of chunks) {
    throwIfAborted(options.signal);
    for (let i = 0; i < chunk.length; ) {
      const n = Math.min(chunk.length - i, run.length - filled);
      run.set(chunk.subarray(i, i + n), filled);
      filled += n;
      i += n;
      if (filled === run.length) {
        await writeRun(filled);
        runAt += filled;
        filled = 0;
      }
    }
    at += chunk.length;
    options.onProgress?.(at);
  }
  // The tail: zero-padded to the image's 512-byte granularity, then the size cut to it.
  const size = Math.ceil(at / 512) * 512;
  run.fill(0, filled, filled + (size - at));
  if (size > runAt) await writeRun(size - runAt);
  if (target.size !== size) await target.resize(size, { shrink: true });
  return at;
}

/** Raw bytes in order into the target; zero blocks are skipped where the target is already zero. */
async function copyRaw(chunks: AsyncIterable<Uint8Array>, target: BlockDevice, options: ReadStreamOptions): Promise<number> {
  let at = 0;
  for await (const chunk of chunks) {
    throwIfAborted(options.signal);
    if (at + chunk.length > target.size) throw new QcowError('QCOW_INVALID_ARGUMENT', `the stream is longer than its announced size (${target.size} bytes)`);
    if (!options.targetIsZero || !isZero(chunk)) await target.write(at, chunk);
    at += chunk.length;
    options.onProgress?.(at);
  }
  if (at !== target.size) throw new QcowError('QCOW_IO', `the stream ended after ${at} of ${target.size} bytes`);
  return at;
}

function isZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/**
 * Guest clusters the streamed image does not decide: from its backing file when it names one,
 * zeros in an existing target, nothing in a fresh one.
 */
async function fillUndecided(target: BlockDevice, info: StreamImageInfo, decided: (c: number) => boolean, options: ReadStreamOptions): Promise<void> {
  const backing = info.backingFile !== undefined ? await openBackingOf(info, options) : undefined;
  if (!backing && options.targetIsZero) return;
  const cs = info.clusterSize;
  const clusters = Math.ceil(info.size / cs);
  const buf = new Uint8Array(Math.max(cs, 1 << 20) - (Math.max(cs, 1 << 20) % cs));
  try {
    for (let c = 0; c < clusters; ) {
      throwIfAborted(options.signal);
      if (decided(c)) {
        c++;
        continue;
      }
      let end = c + 1;
      while (end < clusters && !decided(end) && (end - c) * cs < buf.length) end++;
      const from = c * cs;
      const len = Math.min(info.size, end * cs) - from;
      if (backing) {
        const data = buf.subarray(0, len);
        const n = Math.max(0, Math.min(len, backing.size - from));
        data.fill(0);
        if (n > 0) await backing.read(from, data.subarray(0, n));
        if (!options.targetIsZero || !isZero(data)) await target.write(from, data);
      } else await target.writeZeroes(from, len, { mayUnmap: true });
      c = end;
    }
  } finally {
    await backing?.close();
  }
}

async function openBackingOf(info: StreamImageInfo, options: ReadStreamOptions): Promise<BlockDevice> {
  if (!options.openBacking) throw new QcowError('QCOW_UNSUPPORTED', `the streamed image names a backing file (${info.backingFile}) and there is no way to open it here`);
  return options.openBacking(info.backingFile!, info.backingFormat);
}
