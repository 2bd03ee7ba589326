/**
 * `qemu-img convert`: copy the guest content of one or more images (concatenated) into a target.
 * Ranges the source chain reports as zero are skipped without reading; data is read in large
 * chunks, several in flight, and runs of zeros at least `sparseSize` long are left unwritten on a
 * fresh target (or zeroed cheaply on an existing one). With a target backing image, only what
 * differs from it is written. With `compress`, whole clusters go through writeCompressed.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { isZero } from '../core/bytes.js';
import { ChainStatus } from './chain-status.js';

export interface ConvertOptions {
  /** Write clusters compressed (the target must support it). */
  compress?: boolean;
  /** Shortest run of zeros to leave sparse (qemu-img -S); 0 writes every byte. Default 4 KiB. */
  sparseSize?: number;
  /** The target already reads as zeros everywhere (a freshly created image without backing). */
  targetIsZero?: boolean;
  /** Bytes in flight at once: chunks of `chunkSize`, this many at a time. */
  parallel?: number;
  chunkSize?: number;
  signal?: AbortSignal;
  onProgress?: (done: number, total: number) => void;
}

export async function convert(sources: BlockDevice[], target: BlockDevice, options: ConvertOptions = {}): Promise<void> {
  const total = sources.reduce((n, s) => n + s.size, 0);
  if (total > target.size) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `target is smaller (${target.size} bytes) than the source (${total} bytes)`);
  }
  if (options.compress && !target.writeCompressed) {
    throw new QcowError('QCOW_UNSUPPORTED', `the ${target.format} format does not support compression`);
  }
  const sparse = options.sparseSize ?? 4096;
  const cluster = Math.max(target.clusterSize, 512);
  let chunk = options.chunkSize ?? 2 * 1024 * 1024;
  chunk = Math.max(cluster, chunk - (chunk % cluster));
  const parallel = Math.max(1, options.parallel ?? 8);
  const targetBacking = target.backing;

  // Work items in order: [source, source offset, target offset, length], never crossing a source.
  type Item = { src: BlockDevice; status: ChainStatus; srcOff: number; dstOff: number; len: number };
  const items: Item[] = [];
  let base = 0;
  for (const src of sources) {
    const status = new ChainStatus(src);
    for (let off = 0; off < src.size; off += chunk) items.push({ src, status, srcOff: off, dstOff: base + off, len: Math.min(chunk, src.size - off) });
    base += src.size;
  }

  let done = 0;
  let next = 0;
  // ChainStatus is a forward cursor: items of one source are taken in order, so queries stay sorted.
  const statusLock = new Map<ChainStatus, Promise<unknown>>();
  const spans = async (it: Item) => {
    const prev = statusLock.get(it.status) ?? Promise.resolve();
    const p = prev.then(async () => {
      const out: { off: number; len: number; zero: boolean }[] = [];
      for (let o = it.srcOff; o < it.srcOff + it.len; ) {
        const e = await it.status.at(o, it.srcOff + it.len - o);
        out.push({ off: o, len: e.length, zero: !e.present || e.zero });
        o += e.length;
      }
      return out;
    });
    statusLock.set(it.status, p.catch(() => undefined));
    return p;
  };

  const worker = async () => {
    const buf = new Uint8Array(chunk);
    const backBuf = targetBacking ? new Uint8Array(chunk) : undefined;
    while (next < items.length) {
      throwIfAborted(options.signal);
      const it = items[next++]!;
      const list = await spans(it);
      const data = buf.subarray(0, it.len);
      let anyData = false;
      for (const s of list) {
        const view = data.subarray(s.off - it.srcOff, s.off - it.srcOff + s.len);
        if (s.zero) view.fill(0);
        else {
          await it.src.read(s.off, view);
          anyData = true;
        }
      }
      await writeChunk(target, it.dstOff, data, anyData, {
        compress: !!options.compress,
        sparse,
        cluster,
        targetIsZero: !!options.targetIsZero && !targetBacking,
        backing: targetBacking,
        backBuf,
      });
      done += it.len;
      options.onProgress?.(done, total);
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, items.length) }, worker));
}

interface ChunkContext {
  compress: boolean;
  sparse: number;
  cluster: number;
  targetIsZero: boolean;
  backing: BlockDevice | null;
  backBuf: Uint8Array | undefined;
}

async function writeChunk(target: BlockDevice, dstOff: number, data: Uint8Array, anyData: boolean, cx: ChunkContext): Promise<void> {
  // What the target reads before we write: zeros, or its backing image.
  let before: Uint8Array | undefined;
  if (cx.backing) {
    before = cx.backBuf!.subarray(0, data.length);
    const n = Math.max(0, Math.min(data.length, cx.backing.size - dstOff));
    if (n > 0) await cx.backing.read(dstOff, before.subarray(0, n));
    before.fill(0, n);
  }
  if (!anyData && (cx.targetIsZero || (before && isZero(before)))) return;

  const unit = cx.compress ? cx.cluster : cx.sparse > 0 ? gcdUnit(cx.sparse, cx.cluster) : data.length;
  let runStart = -1;
  const flushRun = async (end: number) => {
    if (runStart < 0) return;
    const slice = data.subarray(runStart, end);
    if (cx.compress) {
      for (let o = 0; o < slice.length; o += cx.cluster) await target.writeCompressed!(dstOff + runStart + o, slice.subarray(o, o + cx.cluster));
    } else await target.write(dstOff + runStart, slice);
    runStart = -1;
  };
  for (let o = 0; o < data.length; o += unit) {
    const block = data.subarray(o, Math.min(o + unit, data.length));
    const same = before ? equal(block, before.subarray(o, o + block.length)) : cx.targetIsZero && isZero(block);
    const zeroNeeded = !same && !before && isZero(block);
    if (same) {
      await flushRun(o);
    } else if (zeroNeeded) {
      // Existing target: make the range read as zeros without writing data where the format can.
      await flushRun(o);
      await target.writeZeroes(dstOff + o, block.length, { mayUnmap: true });
    } else if (runStart < 0) runStart = o;
  }
  await flushRun(data.length);
}

function gcdUnit(sparse: number, cluster: number): number {
  // Judge zeros in blocks of the -S size, but never finer than 512 bytes.
  return Math.max(512, Math.min(sparse, cluster * 16));
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
