/**
 * `qemu-img convert`: copy the guest content of one or more images (concatenated) into a target.
 *
 * How it stays fast and small:
 * - A planner walks the sources' chain status once, front to back, and cuts the guest range into
 *   work items: chunks with data (at most `chunkSize`, aligned in the target so compressed
 *   clusters never straddle two items) and zero runs of any length. Zero runs are never read;
 *   data spans are read from the layer of a backing chain that holds them, not through the top.
 * - `parallel` workers take items in order; each owns one buffer, reused for every item, so memory
 *   is `parallel x chunkSize` whatever the image size (a 4 TiB sparse disk costs what a small one
 *   does). Reads of later items overlap the write of earlier ones. A plain copy into raw takes
 *   items four times larger in a quarter of the workers: the same memory (see PLAIN_CHUNK).
 * - A plain copy into a raw file moves each item whose data is plain bytes of local files (raw
 *   files, qcow2's normal clusters, in any layer) with one native call on the thread pool
 *   (ops/native-copy.ts): read, zero scan and write in 1 MiB pieces, the decisions of chunkWrites.
 *   Other items, and every item without the host addon, take the TypeScript path below.
 * - Writes are issued in guest order (as qemu-img without -W), so the target's layout is the same
 *   on every run; with `outOfOrder` (qemu-img -W) they may be issued in any order. Compressed
 *   writes are issued in order too, and the target compresses the clusters of several of them
 *   side by side (node:zlib works on the libuv pool) before placing them in that order.
 *
 * What is written where (qemu-img's rules):
 * - Fresh target without backing (`targetIsZero`): zero runs and all-zero blocks of `sparseSize`
 *   bytes are left alone. `sparseSize` 0 disables that: every byte is written (fully allocated).
 * - Existing target (-n): zero runs are written as zeros (unmapped where the format can).
 * - Target with a backing file (-B): only what differs from the backing file's content is written.
 */
import type { BlockDevice, PlacedRange } from '../core/block-device.js';
import type { ByteStore } from '../storage/types.js';
import { alignedBuffers } from '../core/aligned.js';
import { hugePageBuffers } from '#host-copy';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { ChainStatus } from './chain-status.js';
import { ConcatSource } from './concat.js';
import { NativeCopy, type NativeLane } from './native-copy.js';
import { SalvagingSource } from './salvage.js';
import { allZero, blockRunEnd, sameBytes, scanViewOf } from './zero-scan.js';

/** Options of {@link convert}: qemu-img convert's switches, plus how much work is in flight. */
export interface ConvertOptions {
  /** Write clusters compressed (the target must support it). */
  compress?: boolean;
  /** Shortest run of zeros to leave sparse (qemu-img -S); 0 writes every byte. Default 4 KiB. */
  sparseSize?: number;
  /** The target already reads as zeros everywhere (a freshly created image without backing). */
  targetIsZero?: boolean;
  /**
   * Whether a target with a backing file gets only what differs from that backing file (the
   * default: qemu-img -B, the target made over the source's backing chain). False writes the
   * source whole, zero runs included, as qemu-img convert -n does into an existing image whose
   * backing file it knows nothing about.
   */
  diffAgainstBacking?: boolean;
  /**
   * Work items in flight at once (each holds one buffer of `chunkSize`). Default 8. A plain copy
   * into raw without `chunkSize` runs a quarter as many items of four times the size (see
   * PLAIN_CHUNK): the same buffer memory.
   */
  parallel?: number;
  /** Largest work item with data, in bytes. Default 2 MiB (see DEFAULT_CHUNK); 8 MiB for a plain copy into raw. */
  chunkSize?: number;
  /** Let writes complete in any order (qemu-img -W). */
  outOfOrder?: boolean;
  /**
   * Copy offload (qemu-img -C): data the source stores as plain file bytes goes to the target's
   * file with copy_file_range, never through our buffers. As in qemu-img, data is copied as it is
   * (no search for zero blocks inside it, so `sparseSize` cannot be given), not with compression,
   * and not into a target with a backing file (whose content we compare against). Where the stores
   * cannot (not two local files, other file systems, encrypted or compressed clusters) the bytes
   * are read and written as usual.
   */
  copyOffload?: boolean;
  /**
   * Go on past what cannot be read (qemu-img --salvage): a failed read or block-status query of
   * the source becomes a warning (`onWarning`), unreadable sectors are written as zeros, and
   * sectors of unknown status are copied as data (see ops/salvage.ts). Items are then copied one
   * at a time, in order, so the warnings come in the order of the source.
   */
  salvage?: boolean;
  /** Told each warning of a salvaging copy, in qemu-img's words (without its `warning:` prefix). */
  onWarning?: (message: string) => void;
  /** Stops the operation between steps; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
  /**
   * Called as work items finish, as qemu-img counts its progress: bytes of data copied so far,
   * out of all the data to copy (zeros count too when `sparseSize` is 0, as they are written
   * then). Giving it costs one more pass over the sources' allocation, to learn the total.
   */
  onProgress?: (done: number, total: number) => void;
}

/** A range the planner hands to the workers, in target (= concatenated source) offsets. */
type WorkItem =
  | { kind: 'zero'; offset: number; length: number }
  | { kind: 'data'; offset: number; length: number; spans: { offset: number; length: number; zero: boolean; depth: number }[] };

/**
 * The default largest data item: 2 MiB, as qemu-img. Round seven moved plain copies to 4 MiB
 * items, which halves the JavaScript spent per item (callgrind: 1 GiB raw -> qcow2 381M -> 302M
 * instructions), but on a quiet 2-core machine with 2 MiB of L2 cache per core the kernel's copies
 * then miss the cache: each item is copied into our buffer, scanned for zeros and copied out again,
 * and 4 MiB no longer stays in L2 between those passes. 512 MiB mixed raw -> qcow2 into ext4, 4
 * alternating runs (perf stat): 4 MiB items 425-551 ms of CPU (system 356-496), 2 MiB 270-324
 * (system 216-253), qemu-img 199-219; 1 MiB and 512 KiB were worse again (more JavaScript, no less
 * kernel time). Instruction counts miss this, and so did round seven's measurements on a loaded
 * machine, where other processes evicted the caches either way.
 */
const DEFAULT_CHUNK = 2 * 1024 * 1024;

/**
 * The largest data item of a plain copy into a raw target (no compression, backing file, copy
 * offload or salvaging, and no `chunkSize` given), in a quarter of the lanes (`parallel` x 2 MiB
 * of buffers, as with DEFAULT_CHUNK: 2 lanes of 8 MiB by default). Each item costs the same
 * JavaScript whatever its size (the planner's step, the turn, node:fs's wrappers and promise
 * reactions of its reads and writes: ~200k instructions, callgrind), and fewer items cost less:
 * a 256 MiB qcow2 -> raw convert took 21-26M instructions beyond a 1 MiB one with 8 lanes of
 * 2 MiB, 16-17M with 2 lanes of 8 MiB. Round seven's worry about larger items (the kernel's copies
 * missing the 2 MiB L2 cache between read, zero scan and write) did not show in round thirteen's
 * runs, but those ran under load (see docs/performance.md). Raw only: where a format places
 * clusters (qcow2's L2 tables and data), the request size may change the layout.
 */
const PLAIN_CHUNK = 8 * 1024 * 1024;

/** Zero runs are handed out in pieces of at most this, so progress moves on huge sparse images. */
const ZERO_ITEM_MAX = 2 ** 30;

/**
 * Copy the guest content of `sources` (concatenated, in order) into `target` at offset 0, as
 * `qemu-img convert` does: zero runs are skipped or written as zeros, and a target with a backing
 * file gets only what differs from it. The target must be at least as large as the sources; it
 * is neither flushed nor closed here.
 *
 * @example
 * ```ts
 * import { openImage, createImage, convert } from 'qcow/node';
 *
 * await using src = await openImage('disk.img', { readOnly: true });
 * await createImage('disk.qcow2', { format: 'qcow2', size: src.size });
 * await using dst = await openImage('disk.qcow2', { format: 'qcow2' });
 * await convert([src], dst, { targetIsZero: true, compress: true, onProgress: (done, total) => console.log(done / total) });
 * await dst.flush();
 * ```
 */
export async function convert(sources: BlockDevice[], target: BlockDevice, options: ConvertOptions = {}): Promise<void> {
  const warn = options.onWarning ?? (() => undefined);
  const src = options.salvage ? new SalvagingSource(sources, warn) : new ConcatSource(sources);
  const total = src.size;
  if (total > target.size) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `output file is smaller than input file (${target.size} < ${total} bytes)`, { file: target.filename });
  }
  if (options.compress && !target.writeCompressed) {
    throw new QcowError('QCOW_UNSUPPORTED', 'Compression not supported for this file format', { file: target.filename });
  }
  const sparse = options.sparseSize ?? 4096;
  if (!Number.isSafeInteger(sparse) || sparse < 0 || sparse % 512 !== 0) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid sparse size ${sparse}: a multiple of 512, or 0`);
  }
  if (options.copyOffload && options.salvage) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Cannot use copy offloading in salvaging mode');
  if (options.copyOffload && options.compress) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Cannot enable copy offloading when -c is used');
  if (options.copyOffload && options.sparseSize !== undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Cannot enable copy offloading when -S is used');
  const cluster = Math.max(target.clusterSize, 512);
  const backing = options.diffAgainstBacking === false ? null : target.backing;
  // A target with a backing file gets only what differs from it: that needs the bytes in hand.
  let offload = !!options.copyOffload && !!target.writePlaced && !backing;
  // A plain copy into raw takes larger items in fewer lanes (see PLAIN_CHUNK): the same buffer
  // memory, a quarter of the per-item JavaScript.
  const plain = options.chunkSize === undefined && target.format === 'raw' && !options.compress && !options.salvage && !backing && !offload;
  let chunk = options.chunkSize ?? (plain ? PLAIN_CHUNK : DEFAULT_CHUNK);
  chunk = Math.max(cluster, chunk - (chunk % cluster));
  const asked = options.salvage ? 1 : Math.max(1, Math.min(64, options.parallel ?? 8));
  const parallel = plain ? Math.max(1, Math.ceil((asked * DEFAULT_CHUNK) / chunk)) : asked;
  // In order unless -W: compressed chunks too, so that their clusters are placed in guest order
  // (the target compresses several calls' clusters side by side and places them in call order).
  const ordered = !options.outOfOrder;
  const skipZeros = !!options.targetIsZero && !backing && sparse > 0;
  const ctx: WriteContext = {
    target,
    compress: !!options.compress,
    sparse,
    cluster,
    targetIsZero: !!options.targetIsZero && !backing,
    backing,
    compressRunClusters: Math.max(1, target.writeCompressedMaxClusters ?? 1),
  };

  // Progress counts the bytes that are copied (qemu-img's allocated_done / allocated_sectors).
  const counted = (zero: boolean) => !zero || sparse === 0;
  // qemu-img always walks the source once to count what it copies: salvaging, that walk's
  // warnings are part of its output, so the walk is made (over a fresh source, from the start).
  const toCopy = options.onProgress || options.salvage ? await bytesToCopy(options.salvage ? new SalvagingSource(sources, warn) : src, counted, options.signal) : 0;
  let done = 0;
  const progress = (n: number) => {
    if (n <= 0) return;
    done += n;
    options.onProgress?.(done, toCopy);
  };
  const weight = (item: WorkItem) => {
    if (!options.onProgress) return 0;
    if (item.kind === 'zero') return counted(true) ? item.length : 0;
    let n = 0;
    for (const s of item.spans) if (counted(s.zero)) n += s.length;
    return n;
  };

  // --- the planner: one pass over the chain status, in order ---
  // It works on a grid of `chunk`-sized cells (aligned in the target, so clusters never straddle
  // two items): a cell with any data is one item; whole cells of zeros join into one zero run.
  async function* plan(): AsyncGenerator<WorkItem> {
    let zeroStart = -1;
    let zeroEnd = -1;
    for (let cell = 0; cell < total; ) {
      throwIfAborted(options.signal);
      const cellEnd = Math.min(total, cell + chunk);
      const first = src.statusNow(cell, total - cell) ?? (await src.status(cell, total - cell));
      const firstZero = !first.present || first.zero;
      if (firstZero && cell + first.length >= cellEnd) {
        const end = cell + first.length >= total ? total : cell + Math.floor(first.length / chunk) * chunk;
        if (zeroStart < 0) zeroStart = cell;
        zeroEnd = end;
        cell = end;
        continue;
      }
      if (zeroStart >= 0) {
        yield* zeroRun(zeroStart, zeroEnd);
        zeroStart = -1;
      }
      const item: Extract<WorkItem, { kind: 'data' }> = { kind: 'data', offset: cell, length: cellEnd - cell, spans: [] };
      let e = first;
      for (let off = cell; off < cellEnd; ) {
        const len = Math.min(e.length, cellEnd - off);
        const zero = !e.present || e.zero;
        // Neighbouring spans of the same kind become one: one read for a run of data clusters.
        // Data spans keep to one layer: they are read from the layer that holds them (and copy
        // offload takes the bytes from there too).
        const last = item.spans[item.spans.length - 1];
        if (last && last.zero === zero && (zero || last.depth === e.depth)) last.length += len;
        else item.spans.push({ offset: off, length: len, zero, depth: e.depth });
        off += len;
        if (off < cellEnd) e = src.statusNow(off, cellEnd - off) ?? (await src.status(off, cellEnd - off));
      }
      yield item;
      cell = cellEnd;
    }
    if (zeroStart >= 0) yield* zeroRun(zeroStart, zeroEnd);
  }
  function* zeroRun(start: number, end: number): Generator<WorkItem> {
    if (skipZeros) {
      if (counted(true)) progress(end - start);
      return;
    }
    for (let off = start; off < end; off += ZERO_ITEM_MAX) yield { kind: 'zero', offset: off, length: Math.min(ZERO_ITEM_MAX, end - off) };
  }

  // --- handing items out, each with its place in the write order ---
  const planner = plan();
  let pulling: Promise<unknown> = Promise.resolve();
  let writeTail: Promise<void> = Promise.resolve();
  type Ticket = { item: WorkItem; turn: Promise<void>; release: () => void };
  const take = (): Promise<Ticket | undefined> => {
    const p = pulling.then(async () => {
      const r = await planner.next();
      if (r.done) return undefined;
      const turn = writeTail;
      let release!: () => void;
      writeTail = new Promise<void>((resolve) => (release = resolve));
      return { item: r.value, turn, release };
    });
    pulling = p.catch(() => undefined);
    return p;
  };

  let failure: unknown;
  // Page-aligned copy buffers: the kernel copies into and out of them faster (core/aligned.ts),
  // on huge pages where the host allows (fewer page faults and TLB misses, host/copy.node.ts).
  const count = backing ? 2 * parallel : parallel;
  const buffers = hugePageBuffers(count, chunk) ?? alignedBuffers(count, chunk);
  // A plain copy into a raw file moves items whose data is plain bytes of local files with one
  // native call each (ops/native-copy.ts); the rest, and everything without the addon, as below.
  const native = plain ? await NativeCopy.for(target, sparse, ctx.targetIsZero, chunk) : undefined;
  // Each step of an item is its own small function. V8 counts an async function's resumptions
  // against the function's size when it decides what to optimise: one large worker function that
  // awaited six times per item was re-compiled by TurboFan within the first GiB (35-70 ms of CPU
  // on the main thread, more than the JavaScript it made faster over the whole copy).
  type Lane = { buf: Uint8Array; before: Uint8Array | undefined; dirty: [number, number][]; native?: NativeLane };
  const zeroItem = async (t: Ticket, lane: Lane) => {
    if (ordered) await t.turn;
    await writeZeroRun(ctx, t.item.offset, t.item.length, lane.buf, lane.before, options.signal);
  };
  const offloadItem = async (t: Ticket, item: DataItem, lane: Lane) => {
    const ops = await offloadWrites(ctx, src, item, lane.buf);
    // Pieces that could not be copied were read into the buffer: it is no longer clean.
    lane.dirty = [[0, item.length]];
    if (ordered) await t.turn;
    throwIfAborted(options.signal);
    const writing = ops.map((op) =>
      op().catch((e: unknown) => {
        // The stores cannot copy between themselves after all (another file system, an old
        // kernel): as qemu-img does, fall back to reading and writing, here and from now on.
        if (!(e instanceof OffloadRefused)) throw e;
        offload = false;
        return e.fallback();
      }),
    );
    t.release();
    await settleAll(writing);
  };
  const nativeItem = async (t: Ticket, item: DataItem, lane: Lane): Promise<boolean> => {
    const count = await native!.place(src, item, lane.native!);
    if (count < 0) return false;
    // The loop leaves the buffer as it pleases (zero blocks it never looked at are not cleared).
    lane.dirty = [[0, item.length]];
    // The whole copy takes its turn, not only the writes: two items copying at once on two pool
    // threads (or only their writes taking turns, behind a lock in the loop) cost more system time
    // in alternating runs under load (1 GiB qcow2 -> raw, sys 0.81-0.82 s against 0.55-0.56 in
    // turn), and took no less wall; the main thread still places the next item meanwhile.
    await t.turn;
    throwIfAborted(options.signal);
    await native!.run(item, count, lane.buf, lane.native!);
    return true;
  };
  const dataItem = async (t: Ticket, item: DataItem, lane: Lane) => {
    if (native && (await nativeItem(t, item, lane))) return;
    const data = lane.buf.subarray(0, item.length);
    const knownZero: [number, number][] = [];
    const anyData = await fillItem(src, item, data, lane, knownZero);
    const before = lane.before && (await readBefore(ctx, item.offset, data.length, lane.before));
    const ops = chunkWrites(ctx, item.offset, data, anyData, before, knownZero);
    if (ordered) await t.turn;
    throwIfAborted(options.signal);
    // Issued in turn, finished in parallel: the target takes its allocation decisions in
    // the order of the calls (qcow2 and qcow queue them on a FIFO lock), so the layout
    // stays that of guest order while the data of several chunks is written at once.
    const writing = issueWrites(ctx, ops);
    t.release();
    await settleAll(writing);
  };
  const worker = async (w: number) => {
    // `dirty`: the ranges of `buf` that may hold non-zero bytes (see fillItem).
    const lane: Lane = { buf: buffers[w]!, before: backing ? buffers[parallel + w] : undefined, dirty: [], native: native?.lane() };
    for (;;) {
      if (failure !== undefined) return;
      const t = await take();
      if (!t) return;
      try {
        throwIfAborted(options.signal);
        const item = t.item;
        await (item.kind === 'zero' ? zeroItem(t, lane) : offload ? offloadItem(t, item, lane) : dataItem(t, item, lane));
        progress(weight(item));
      } finally {
        t.release();
      }
    }
  };
  const workers = Array.from({ length: parallel }, (_, w) =>
    worker(w).catch((e: unknown) => {
      failure ??= e;
    }),
  );
  await Promise.all(workers);
  if (failure !== undefined) {
    await planner.return(undefined).catch(() => undefined);
    throw failure;
  }
}

type DataItem = Extract<WorkItem, { kind: 'data' }>;

/** How many bytes of the source the copy will write: its data, and its zeros where `counted`. */
async function bytesToCopy(src: ConcatSource, counted: (zero: boolean) => boolean, signal: AbortSignal | undefined): Promise<number> {
  let n = 0;
  for (let off = 0; off < src.size; ) {
    throwIfAborted(signal);
    const e = await src.status(off, src.size - off);
    if (counted(!e.present || e.zero)) n += e.length;
    off += e.length;
  }
  return n;
}

/**
 * Read a data item's spans into `data` (its lane's buffer): data spans from the source, zero spans
 * as zeros. A fresh buffer is all zeros, its pages not even touched yet, so a zero span needs
 * filling only where an earlier item read data there (`lane.dirty`): filling every zero span
 * touched up to 2 MiB of fresh pages per item of a sparse image (page faults cost ~0.6 ms a MiB
 * on our VM) to write zeros over zeros. Pushes the zero spans to `knownZero`; true when any span
 * held data.
 *
 * The data spans are read all at once: an item of a backing chain has one span per layer that
 * holds part of it (the bench's 3-layer chain: 1 MiB from one layer, 1 MiB from another in every
 * 2 MiB), and reading them one after another made each item wait for two trips through the
 * thread pool in a row.
 */
function fillItem(src: ConcatSource, item: DataItem, data: Uint8Array, lane: { dirty: [number, number][] }, knownZero: [number, number][]): Promise<boolean> {
  const fresh: [number, number][] = [];
  const dirty = lane.dirty;
  let first: Promise<void> | undefined;
  let more: Promise<void>[] | undefined;
  for (const s of item.spans) {
    const from = s.offset - item.offset;
    const to = from + s.length;
    if (s.zero) {
      knownZero.push([from, to]);
      for (const [x, y] of dirty) if (Math.max(from, x) < Math.min(to, y)) data.fill(0, Math.max(from, x), Math.min(to, y));
    } else {
      fresh.push([from, to]);
      const read = src.read(s.offset, data.subarray(from, to), s.depth);
      if (!first) first = read;
      else (more ??= [first]).push(read);
    }
  }
  // Now possibly non-zero: this item's data, and older data beyond this item's end.
  for (const [x, y] of dirty) if (y > data.length) fresh.push([Math.max(x, data.length), y]);
  lane.dirty = fresh;
  if (!first) return Promise.resolve(false);
  // Never leave a read running into the buffer behind a failure (settleAll waits for them all).
  return (more ? settleAll(more) : first).then(() => true);
}

/** What the target reads at [dstOff, +length) before we write: its backing file's bytes, in `buf`. */
async function readBefore(cx: WriteContext, dstOff: number, length: number, buf: Uint8Array): Promise<Uint8Array> {
  const before = buf.subarray(0, length);
  const n = Math.max(0, Math.min(length, cx.backing!.size - dstOff));
  if (n > 0) await cx.backing!.read(dstOff, before.subarray(0, n));
  before.fill(0, n);
  return before;
}

interface WriteContext {
  target: BlockDevice;
  compress: boolean;
  sparse: number;
  cluster: number;
  /** Nothing was ever written to the target and it has no backing: unwritten ranges read zero. */
  targetIsZero: boolean;
  backing: BlockDevice | null;
  /** Most clusters in one compressed write (the target's writeCompressedMaxClusters). */
  compressRunClusters: number;
}

/** The source reads zeros over [offset, +length): make the target read zeros there too. */
async function writeZeroRun(cx: WriteContext, offset: number, length: number, buf: Uint8Array, before: Uint8Array | undefined, signal: AbortSignal | undefined) {
  if (!cx.backing) {
    if (cx.targetIsZero && cx.sparse > 0) return;
    if (cx.sparse > 0) {
      await cx.target.writeZeroes(offset, length, { mayUnmap: true });
      return;
    }
    // -S 0 asks for a fully allocated target: zeros are written as data (compressed with -c),
    // as qemu-img does, not as zero clusters.
    buf.fill(0);
    for (let o = offset; o < offset + length; o += buf.length) {
      throwIfAborted(signal);
      const m = Math.min(buf.length, offset + length - o);
      await settleAll(issueWrites(cx, chunkWrites(cx, o, buf.subarray(0, m), true, undefined)));
    }
    return;
  }
  // With a backing file, only where the backing file is not zero does anything need writing.
  // Workers reach zero runs in any order, and a status cursor only moves forward: one per run.
  const status = new ChainStatus(cx.backing);
  for (let off = offset; off < offset + length; ) {
    throwIfAborted(signal);
    const e = off < cx.backing.size ? await status.at(off, Math.min(offset + length, cx.backing.size) - off) : undefined;
    const n = e ? e.length : offset + length - off;
    if (e && e.present && !e.zero) {
      for (let o = off; o < off + n; o += buf.length) {
        const m = Math.min(buf.length, off + n - o);
        const data = buf.subarray(0, m);
        data.fill(0);
        await settleAll(issueWrites(cx, chunkWrites(cx, o, data, false, await readBefore(cx, o, m, before!))));
      }
    }
    off += n;
  }
}

/** A copy the stores refused (QCOW_UNSUPPORTED); `fallback` does the same job by read and write. */
class OffloadRefused extends Error {
  constructor(readonly fallback: () => Promise<void>) {
    super('copy offload refused');
  }
}

/**
 * The writes of one data item under copy offload, worked out before its turn: zero spans as in a
 * zero run, plain runs of data as file-to-file copies into the ranges the target places them at,
 * and anything else (compressed or encrypted source clusters) read into `buf` and written.
 */
async function offloadWrites(cx: WriteContext, src: ConcatSource, item: Extract<WorkItem, { kind: 'data' }>, buf: Uint8Array): Promise<(() => Promise<void>)[]> {
  const ops: (() => Promise<void>)[] = [];
  const readAndWrite = async (offset: number, length: number) => {
    const data = buf.subarray(offset - item.offset, offset - item.offset + length);
    await src.read(offset, data);
    return () => cx.target.write(offset, data);
  };
  for (const s of item.spans) {
    if (s.zero) {
      if (!cx.targetIsZero) ops.push(() => cx.target.writeZeroes(s.offset, s.length, { mayUnmap: true }));
      continue;
    }
    for (const e of await src.plainExtents(s.offset, s.length, s.depth)) {
      const { store, hostOffset } = e;
      // The target places whole clusters; a run's unaligned head and tail (a source with smaller
      // clusters, holes in a raw file) are read and written.
      const end = e.offset + e.length;
      const from = Math.ceil(e.offset / cx.cluster) * cx.cluster;
      const to = end === cx.target.size ? end : Math.floor(end / cx.cluster) * cx.cluster;
      if (!store || hostOffset === undefined || from >= to) {
        ops.push(await readAndWrite(e.offset, e.length));
        continue;
      }
      if (e.offset < from) ops.push(await readAndWrite(e.offset, from - e.offset));
      ops.push(async () => {
        try {
          await cx.target.writePlaced!(from, to - from, (r) => copyStoreRange(store, hostOffset + (r.offset - e.offset), r));
        } catch (err) {
          if (!(err instanceof QcowError && err.code === 'QCOW_UNSUPPORTED')) throw err;
          throw new OffloadRefused(async () => (await readAndWrite(from, to - from))());
        }
      });
      if (to < end) ops.push(await readAndWrite(to, end - to));
    }
  }
  return ops;
}

/** Copy a placed range from `from` in `store`; what lies past the source's end reads as zeros. */
async function copyStoreRange(store: ByteStore, from: number, r: PlacedRange): Promise<void> {
  if (!store.copyTo) throw new QcowError('QCOW_UNSUPPORTED', 'this store cannot copy file to file', { file: store.name });
  const copied = await store.copyTo(r.store, from, r.hostOffset, r.length);
  for (let done = copied; done < r.length; ) {
    const n = Math.min(r.length - done, 1 << 20);
    await r.store.write(r.hostOffset + done, new Uint8Array(n));
    done += n;
  }
}

/** One store operation of a chunk, worked out before the chunk's turn to write comes. */
type ChunkWrite = { kind: 'data'; offset: number; data: Uint8Array } | { kind: 'compressed'; offset: number; data: Uint8Array } | { kind: 'zero'; offset: number; length: number };

/**
 * A compressed run's bytes. A compressed write covers whole clusters, the image's last one
 * whole to the image's end: when the source ends inside the target's last cluster (a raw source
 * of 100000 bytes, whose target is 100352, the size rounded up to 512 as qemu-img makes it), the
 * run is padded with the zeros the source reads as beyond its end, as qemu-img's is (QEMU's raw
 * driver counts the source's size in whole 512-byte sectors).
 */
function compressedRunData(cx: WriteContext, dstOff: number, data: Uint8Array, start: number, end: number): Uint8Array {
  const run = data.subarray(start, end);
  const endAt = dstOff + end;
  // Only into the image's last cluster, as QEMU pads only a write that reaches the image's end
  // (a short source into a larger existing target, `-n`, is refused there and here).
  if (endAt % cx.cluster === 0 || endAt >= cx.target.size || endAt - (endAt % cx.cluster) + cx.cluster < cx.target.size) return run;
  const padded = new Uint8Array(cx.target.size - (dstOff + start));
  padded.set(run);
  return padded;
}

/**
 * The writes that put one chunk of guest data at `dstOff`. Compared in blocks (the -S size, or the
 * cluster when compressing): blocks that already read the same in the target are skipped, the
 * rest written in runs as large as possible.
 */
function chunkWrites(
  cx: WriteContext,
  dstOff: number,
  data: Uint8Array,
  anyData: boolean,
  before: Uint8Array | undefined,
  knownZero: [number, number][] = [],
): ChunkWrite[] {
  // Blocks inside a range the source reported as zero are zero without looking: scanning them
  // cost most of a convert of sparse data (64 KiB every 2 MiB: 1 GiB of zeros scanned in JS).
  const { wholeBlockEnd: knownZeroEnd, startAfter: knownZeroStartAfter } = knownZeroCursor(knownZero);
  if (before) {
    if (sameBytes(data, before)) return [];
  } else if (!anyData && cx.targetIsZero && cx.sparse > 0) return [];

  const ops: ChunkWrite[] = [];
  if (cx.compress) {
    // Runs of clusters to write, as long as the target takes in one call: qcow2 compresses a call's
    // clusters side by side and places them in order, as it would one call per cluster (the same
    // file). A call per cluster cost a 3 MiB `convert -c` ~180 page faults of promises and async
    // frames (the writer's ordering, lock and allocation steps, once per call) and a scavenge.
    const runMax = cx.compressRunClusters * cx.cluster;
    let runStart = -1;
    const endRun = (end: number) => {
      if (runStart >= 0) ops.push({ kind: 'compressed', offset: dstOff + runStart, data: compressedRunData(cx, dstOff, data, runStart, end) });
      runStart = -1;
    };
    for (let o = 0; o < data.length; o += cx.cluster) {
      const block = data.subarray(o, Math.min(o + cx.cluster, data.length));
      // -S 0 compresses zero clusters too (fully allocated output).
      const skip = before ? sameBytes(block, before.subarray(o, o + block.length)) : cx.targetIsZero && cx.sparse > 0 && (knownZeroEnd(o, o + block.length) >= 0 || allZero(block));
      if (skip || o - runStart >= runMax) endRun(o);
      if (!skip && runStart < 0) runStart = o;
    }
    endRun(data.length);
    return ops;
  }
  if (cx.sparse === 0) {
    // Fully allocated output: every byte is written.
    if (!before || !sameBytes(data, before)) ops.push({ kind: 'data', offset: dstOff, data });
    return ops;
  }

  const unit = Math.max(512, Math.min(cx.sparse, data.length));
  let runStart = -1;
  const endRun = (end: number) => {
    if (runStart < 0) return;
    ops.push({ kind: 'data', offset: dstOff + runStart, data: data.subarray(runStart, end) });
    runStart = -1;
  };
  const view = before ? undefined : scanViewOf(data);
  for (let o = 0, end = 0; o < data.length; o = end) {
    let zero: boolean;
    if (before) {
      // Against a backing file: block by block, what already reads the same is left alone.
      end = Math.min(o + unit, data.length);
      if (sameBytes(data.subarray(o, end), before.subarray(o, end))) {
        endRun(o);
        continue;
      }
      zero = false;
    } else {
      // A known-zero range is taken whole (in whole blocks), not block by block.
      const zeroEnd = knownZeroEnd(o, Math.min(o + unit, data.length));
      if (zeroEnd >= 0) {
        end = zeroEnd >= data.length ? data.length : Math.max(Math.min(o + unit, data.length), o + Math.floor((zeroEnd - o) / unit) * unit);
        zero = true;
      } else {
        // Otherwise the bytes say: one scan per run of zero or data blocks (blockRunEnd), which
        // stops where the next known-zero range starts, to take that one without looking.
        const limit = Math.min(data.length, Math.ceil(knownZeroStartAfter(o) / unit) * unit);
        end = blockRunEnd(view!, o, limit, unit, true);
        zero = end > o;
        if (!zero) end = blockRunEnd(view!, o, limit, unit, false);
      }
    }
    if (!zero) {
      if (runStart < 0) runStart = o;
    } else if (cx.targetIsZero) endRun(o);
    else {
      // Existing target: make the range read as zeros without writing data where the format can.
      endRun(o);
      const last = ops[ops.length - 1];
      if (last?.kind === 'zero' && last.offset + last.length === dstOff + o) last.length += end - o;
      else ops.push({ kind: 'zero', offset: dstOff + o, length: end - o });
    }
  }
  endRun(data.length);
  return ops;
}

/**
 * For blocks visited in increasing order, over `ranges` (sorted, not overlapping):
 * `wholeBlockEnd(from, to)` is the end of the range holding all of [from, to), or -1;
 * `startAfter(at)` is where the first range starting after `at` starts (Infinity when none).
 */
function knownZeroCursor(ranges: [number, number][]): { wholeBlockEnd: (from: number, to: number) => number; startAfter: (at: number) => number } {
  // No known zeros (an item of data from a raw file, the usual case): one shared pair, no closures per item.
  if (ranges.length === 0) return NO_KNOWN_ZEROS;
  let i = 0;
  return {
    wholeBlockEnd: (from, to) => {
      while (i < ranges.length && ranges[i]![1] <= from) i++;
      return i < ranges.length && ranges[i]![0] <= from && to <= ranges[i]![1] ? ranges[i]![1] : -1;
    },
    startAfter: (at) => {
      let j = i;
      while (j < ranges.length && ranges[j]![0] <= at) j++;
      return j < ranges.length ? ranges[j]![0] : Infinity;
    },
  };
}

const NO_KNOWN_ZEROS = { wholeBlockEnd: (): number => -1, startAfter: (): number => Infinity };

/** Start a chunk's writes, all at once and in order; the caller waits for them. */
function issueWrites(cx: WriteContext, ops: ChunkWrite[]): Promise<void>[] {
  return ops.map((op) => {
    if (op.kind === 'data') return cx.target.write(op.offset, op.data);
    if (op.kind === 'compressed') return cx.target.writeCompressed!(op.offset, op.data);
    return cx.target.writeZeroes(op.offset, op.length, { mayUnmap: true });
  });
}

/** Wait for every promise, then throw the first failure (never leave writes running behind a throw). */
async function settleAll(list: Promise<void>[]): Promise<void> {
  // Most items are one write (a run of data filling the item) or none: awaited as it is, without
  // allSettled's result array, its result objects and a reaction per element, at every item.
  if (list.length <= 1) {
    if (list.length === 1) await list[0];
    return;
  }
  const results = await Promise.allSettled(list);
  const bad = results.find((r) => r.status === 'rejected');
  if (bad) throw (bad as PromiseRejectedResult).reason;
}
