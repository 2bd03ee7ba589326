/**
 * Write an image front to back into a stream (a pipe, an upload, a browser download): qcow2 or
 * raw, never seeking, in bounded memory, complete and consistent the moment the last chunk is out.
 *
 * qcow2 layout, all decided before the first byte (see write-plan.ts for what is allocated):
 *   cluster 0            header, extensions, backing file name
 *   then                 refcount table, refcount blocks (every cluster of the file counted once)
 *   then                 L1 table
 *   then, per L2 table   the table, followed by the data clusters it maps, in guest order
 * Pass one walks the source's block status to count clusters per L2 table; pass two walks it again
 * range by range, writes each L2 table and then reads and writes its data. Memory: the L1 table
 * and one count per L2 table, one L2 table, and `parallel` chunks of `chunkSize` being read ahead.
 */
import type { BlockDevice } from '../core/block-device.js';
import type { ByteStore } from '../storage/types.js';
import { chainOf } from '../chain/open.js';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { ConcatSource } from '../ops/concat.js';
import { newHeader, parseCreateOptions } from '../formats/qcow2/create.js';
import { MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, l1EntriesFor, qcow2Geometry } from '../formats/qcow2/layout.js';
import { encodeHeader } from '../formats/qcow2/header.js';
import { setL1Entry } from '../formats/qcow2/l1-entry.js';
import { setCopiedNormalEntry, setL2Entry, setZeroPlainEntry } from '../formats/qcow2/l2-entry.js';
import { encodeCompressedDescriptor } from '../formats/qcow2/compressed-descriptor.js';
import { encodeRefcountTable, entriesPerBlock, setRefcount, setRefcountsToOne } from '../formats/qcow2/refcount.js';
import { ClusterKind, planClusters, walkClusters, type KindRules } from './write-plan.js';
import { memorySpill, type Spill } from './spill.js';
import { deflateRaw, zstdCompress } from '../compress/lazy.js';
import { COMPRESSION_ZSTD } from '../formats/qcow2/header.js';
import { maxRefcount } from '../formats/qcow2/refcount.js';

/**
 * Receives the image's bytes in order. The promise resolves once the sink is done with the chunk:
 * the writer then reuses its memory, and sends the next.
 */
export type ChunkSink = ((chunk: Uint8Array) => Promise<void>) & {
  /**
   * Optional: take the next `length` bytes of the stream from `store` at `from` without the
   * writer reading them (fdSink splices a local file into a pipe). Resolves with the bytes taken,
   * possibly fewer or none: the writer reads and sends the rest itself.
   */
  fromStore?: (store: ByteStore, from: number, length: number) => Promise<number>;
};

/** Options of {@link writeImageStream}: the image's format and layout, and how much is read ahead. */
export interface WriteStreamOptions {
  /** 'qcow2' or 'raw'. */
  format: string;
  /** qcow2 creation options as qemu-img -o takes them (cluster_size, compat, refcount_bits, compression_type, lazy_refcounts). */
  options?: Record<string, string>;
  /**
   * The backing file the image names (qcow2). `layer`: the image of the source's chain it is, when
   * it is one (what it holds is then not copied); without it every range the source does not
   * store is written as zeros so the image reads the source's content whatever the file holds.
   */
  backing?: {
    /** The backing file name to record in the header. */
    file: string;
    /** The backing file's format to record in the header. */
    format: string;
    /** The layer of the source's chain that the backing file is, when it is one. */
    layer?: BlockDevice;
  };
  /** qcow2: compress every data cluster (zlib, or zstd with compression_type=zstd). */
  compress?: boolean;
  /**
   * Compressed output only: where the compressed clusters wait until the tables that point at
   * them are out (default: memory, up to 256 MiB; the CLI uses a temporary file).
   */
  spill?: Spill;
  /** Largest read of source data at once. Default 2 MiB. */
  chunkSize?: number;
  /** Chunks read ahead while earlier ones are written. Default 4. */
  parallel?: number;
  /** Stops the operation between steps; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
  /** Guest bytes done and in all (the image's size in the stream is known only for raw). */
  onProgress?: (done: number, total: number) => void;
}

/** What {@link writeImageStream} wrote. */
export interface WriteStreamResult {
  /** Bytes written to the sink. */
  bytes: number;
}

/**
 * Write `sources` (concatenated, as convert does) as one image into `sink`, front to back and
 * never seeking: a qcow2 or raw image into a pipe, an upload or a download.
 *
 * @example
 * ```ts
 * import { openImage, writeImageStream, nodeWritableSink } from 'qcow/node';
 *
 * await using src = await openImage('disk.img', { readOnly: true });
 * const out = nodeWritableSink(process.stdout);
 * const { bytes } = await writeImageStream([src], out.sink, { format: 'qcow2', compress: true });
 * await out.finish();
 * console.error(`${bytes} bytes written`);
 * ```
 */
export async function writeImageStream(sources: BlockDevice[], sink: ChunkSink, options: WriteStreamOptions): Promise<WriteStreamResult> {
  if (options.format === 'raw') {
    if (options.backing) throw new QcowError('QCOW_INVALID_ARGUMENT', 'raw images cannot have a backing file');
    for (const k of Object.keys(options.options ?? {})) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid parameter '${k}' for a raw stream`);
    if (options.compress) throw new QcowError('QCOW_UNSUPPORTED', 'Compression not supported for this file format');
    return writeRawStream(sources, sink, options);
  }
  if (options.format !== 'qcow2') throw new QcowError('QCOW_UNSUPPORTED', `a stream can be written as qcow2 or raw, not ${options.format}`);
  return writeQcow2Stream(sources, sink, options);
}

/** Counts bytes on their way to the sink. */
function counting(sink: ChunkSink): { put: ChunkSink; bytes: () => number } {
  let bytes = 0;
  const put: ChunkSink = (chunk) => {
    bytes += chunk.length;
    return sink(chunk);
  };
  const from = sink.fromStore;
  if (from) {
    put.fromStore = async (store, at, length) => {
      const n = await from(store, at, length);
      bytes += n;
      return n;
    };
  }
  return { put, bytes: () => bytes };
}

/** Bytes handed to the sink's fromStore at once: between two, progress is told and an abort seen. */
const FROM_STORE_BYTES = 8 * 1024 * 1024;

/**
 * Send guest bytes [start, end) of `src`: where the sink can take them straight from the file that
 * stores them (see ChunkSink), it does; the rest is read in chunks as copyRange does.
 */
async function sendRange(
  src: ConcatSource,
  put: ChunkSink,
  start: number,
  end: number,
  o: { chunk: number; parallel: number; signal?: AbortSignal },
  progress: (end: number) => void,
): Promise<void> {
  const emit = async (buf: Uint8Array, at: number) => {
    await put(buf);
    progress(at);
  };
  const fromStore = put.fromStore;
  if (!fromStore) return copyRange(src, start, end - start, { ...o, padTo: 1 }, emit);
  /** The plain runs of layer `depth` over [from, to) from their store; `rest` gets the runs it cannot place. */
  const send = async (from: number, to: number, depth: number, rest: (at: number, end: number) => Promise<void>) => {
    for (const e of await src.plainExtents(from, to - from, depth)) {
      let at = e.offset;
      const eEnd = e.offset + e.length;
      while (e.store && at < eEnd) {
        throwIfAborted(o.signal);
        const n = Math.min(FROM_STORE_BYTES, eEnd - at);
        const moved = await fromStore(e.store, e.hostOffset! + (at - e.offset), n);
        at += moved;
        if (moved > 0) progress(at);
        if (moved < n) break; // the file ended (the rest reads as zeros) or cannot be taken
      }
      if (at < eEnd) await rest(at, eEnd);
    }
  };
  const read = (at: number, to: number) => copyRange(src, at, to - at, { ...o, padTo: 1 }, emit);
  // The top layer's own plain bytes are what the guest reads there. Runs it does not store as such
  // come back without a store: where the chain's status says a backing layer's data decides them,
  // that layer's plain bytes; the rest (compressed, encrypted, zeros) is read.
  await send(start, end, 0, async (from, to) => {
    // Consecutive runs to read are read as one (read-ahead across them: compressed clusters).
    let readFrom = from;
    for (let at = from; at < to; ) {
      const st = await src.status(at, to - at);
      const stEnd = Math.min(to, at + st.length);
      if (st.depth > 0 && st.present && !st.zero) {
        if (readFrom < at) await read(readFrom, at);
        await send(at, stEnd, st.depth, read);
        readFrom = stEnd;
      }
      at = stEnd;
    }
    if (readFrom < to) await read(readFrom, to);
  });
}

/**
 * Read [offset, offset + length) of the source in chunks, `parallel` at a time, and hand each to
 * `emit` in order. `padTo`: each chunk's buffer is this multiple long (the rest zeros).
 */
async function copyRange<T = Uint8Array>(
  src: ConcatSource,
  offset: number,
  length: number,
  o: { chunk: number; parallel: number; padTo: number; signal?: AbortSignal; prepare?: (buf: Uint8Array) => Promise<T> },
  emit: (item: T, end: number) => Promise<void>,
): Promise<void> {
  // `prepare` (compression) runs as soon as a chunk is read, on up to `parallel` chunks at once;
  // `emit` takes the results in order.
  const prepare = o.prepare ?? ((b: Uint8Array) => Promise.resolve(b as unknown as T));
  const ahead: { buf: Promise<T>; end: number; mem: Uint8Array }[] = [];
  // Buffers come back once emitted: fresh 2 MiB allocations cost page faults for every chunk.
  const free: Uint8Array[] = [];
  const size = Math.ceil(o.chunk / o.padTo) * o.padTo;
  let next = offset;
  const end = offset + length;
  const start = () => {
    const n = Math.min(o.chunk, end - next);
    const at = next;
    next += n;
    const mem = free.pop() ?? new Uint8Array(size);
    const buf = mem.subarray(0, Math.ceil(n / o.padTo) * o.padTo);
    buf.fill(0, n); // a reused buffer's padding must read as zeros
    ahead.push({ buf: src.read(at, buf.subarray(0, n)).then(() => prepare(buf)), end: at + n, mem });
  };
  try {
    while (next < end || ahead.length > 0) {
      while (next < end && ahead.length < o.parallel) start();
      throwIfAborted(o.signal);
      const first = ahead.shift()!;
      await emit(await first.buf, first.end);
      free.push(first.mem);
    }
  } finally {
    // Never leave reads running behind a failure.
    await Promise.allSettled(ahead.map((a) => a.buf));
  }
}

async function writeRawStream(sources: BlockDevice[], sink: ChunkSink, options: WriteStreamOptions): Promise<WriteStreamResult> {
  const src = new ConcatSource(sources);
  const out = counting(sink);
  const chunk = options.chunkSize ?? 2 * 1024 * 1024;
  const parallel = options.parallel ?? 4;
  const total = src.size;
  const zeros = new Uint8Array(Math.min(chunk, Math.max(total, 1)));
  for (let off = 0; off < total; ) {
    throwIfAborted(options.signal);
    const e = await src.status(off, total - off);
    if (e.present && !e.zero) {
      await sendRange(src, out.put, off, off + e.length, { chunk, parallel, signal: options.signal }, (end) => options.onProgress?.(end, total));
    } else {
      // A stream has no holes: zeros are bytes like any other (one shared, never-written buffer).
      for (let o = off; o < off + e.length; o += zeros.length) {
        throwIfAborted(options.signal);
        const n = Math.min(zeros.length, off + e.length - o);
        await out.put(n === zeros.length ? zeros : zeros.subarray(0, n));
        options.onProgress?.(o + n, total);
      }
    }
    off += e.length;
  }
  return { bytes: out.bytes() };
}

/** Everything about the image that does not depend on its data. */
interface Qcow2Shape {
  s: ReturnType<typeof parseCreateOptions>;
  size: number;
  cs: number;
  g: ReturnType<typeof qcow2Geometry>;
  l1Entries: number;
  l1Clusters: number;
  rules: KindRules;
  backing?: WriteStreamOptions['backing'];
}

function qcow2Shape(sources: BlockDevice[], options: WriteStreamOptions): Qcow2Shape {
  const o = { ...(options.options ?? {}) };
  delete o.size;
  const backing = options.backing;
  const s = parseCreateOptions(o, backing !== undefined);
  const refuse = (what: string) => new QcowError('QCOW_UNSUPPORTED', `${what} cannot be written to a stream`);
  if (s.extendedL2) throw refuse('extended L2 entries');
  if (s.encryption) throw refuse('an encrypted image');
  if (s.dataFile !== undefined) throw refuse('an image with an external data file');
  if (s.preallocation !== 'off') throw refuse(`preallocation=${s.preallocation}`);
  if (backing && sources.length !== 1) throw new QcowError('QCOW_INVALID_ARGUMENT', 'a backing file needs exactly one source');
  const size = sources.reduce((n, d) => n + d.size, 0);
  const cs = 2 ** s.clusterBits;
  const g = qcow2Geometry(s.clusterBits, false);
  const l1Entries = l1EntriesFor(size, g);
  if (l1Entries * 8 > MAX_L1_BYTES) throw new QcowError('QCOW_INVALID_ARGUMENT', "The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  const rules: KindRules = { zeroFlag: s.version === 3 };
  if (backing) rules.backingDepth = backing.layer ? chainOf(sources[0]!).indexOf(backing.layer) : -1;
  return { s, size, cs, g, l1Entries, l1Clusters: Math.ceil((l1Entries * 8) / cs), rules, backing };
}

/** Refcount table and block clusters for a file of `fixed` other clusters (they count themselves too). */
function refcountClusters(fixed: number, cs: number, refcountBits: number): { tableClusters: number; blocks: number } {
  const perBlock = entriesPerBlock(cs, refcountBits);
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const b = Math.ceil((fixed + tableClusters + blocks) / perBlock);
    const t = Math.ceil((b * 8) / cs);
    if (b <= blocks && t <= tableClusters) break;
    blocks = Math.max(blocks, b);
    tableClusters = Math.max(tableClusters, t);
  }
  if (tableClusters * cs > MAX_REFCOUNT_TABLE_BYTES) throw new QcowError('QCOW_INVALID_ARGUMENT', 'the image needs a refcount table larger than QEMU accepts (8 MiB): use larger clusters');
  return { tableClusters, blocks };
}

/**
 * Header, refcount table and blocks, L1: the first clusters of the file. `refcount(c)` gives each
 * cluster's count (only called below `clusters`); `tableAt[t]` each L2 table's offset (0: none).
 */
async function putMetadata(
  put: ChunkSink,
  shape: Qcow2Shape,
  rc: { tableClusters: number; blocks: number },
  clusters: number,
  refcount: (cluster: number) => number,
  tableAt: Float64Array,
): Promise<void> {
  const { s, cs, l1Entries } = shape;
  const blocksAt = (1 + rc.tableClusters) * cs;
  const h = newHeader(s, shape.size, shape.backing?.file, shape.backing?.format);
  h.l1Size = l1Entries;
  h.l1TableOffset = l1Entries > 0 ? blocksAt + rc.blocks * cs : 0;
  h.refcountTableOffset = cs;
  h.refcountTableClusters = rc.tableClusters;
  const head = new Uint8Array(cs);
  head.set(encodeHeader(h, cs));
  await put(head);
  const table = new Uint8Array(rc.tableClusters * cs);
  encodeRefcountTable(Array.from({ length: rc.blocks }, (_, i) => blocksAt + i * cs), table);
  await put(table);
  const perBlock = entriesPerBlock(cs, s.refcountBits);
  // Runs of clusters counted once share one block image (most blocks of a large image).
  let allOnes: Uint8Array | undefined;
  for (let b = 0; b < rc.blocks; b++) {
    const first = b * perBlock;
    const n = Math.min(perBlock, clusters - first);
    let ones = n === perBlock;
    for (let i = 0; i < n && ones; i++) ones = refcount(first + i) === 1;
    if (ones && allOnes) {
      await put(allOnes);
      continue;
    }
    const block = new Uint8Array(cs);
    // The first block of ones in one call (no checked store per cluster, which V8 then compiled).
    if (ones) setRefcountsToOne(block, 0, n, s.refcountBits);
    else for (let i = 0; i < n; i++) setRefcount(block, i, s.refcountBits, refcount(first + i));
    if (ones) allOnes = block;
    await put(block);
  }
  const l1 = new Uint8Array(shape.l1Clusters * cs);
  for (let t = 0; t < l1Entries; t++) {
    const at = tableAt[t]!;
    if (!at) continue;
    setL1Entry(l1, t, at, true);
  }
  await put(l1);
}

/**
 * Walk one L2 table's range and hand out its entries: zero clusters get the zero flag, data
 * clusters whatever `entryFor` says (in guest order); returns the data runs as [first, count].
 */
async function fillTable(
  src: ConcatSource,
  shape: Qcow2Shape,
  t: number,
  l2: Uint8Array,
  entryFor: (cluster: number) => void,
  signal?: AbortSignal,
): Promise<[number, number][]> {
  const { g, cs, size } = shape;
  const from = t * g.l2Coverage;
  const to = Math.min(size, from + g.l2Coverage);
  const runs: [number, number][] = [];
  await walkClusters(src, from, to, cs, shape.rules, (first, count, kind) => {
    if (kind === ClusterKind.None) return;
    for (let c = first; c < first + count; c++) {
      if (kind === ClusterKind.Zero) setZeroPlainEntry(l2, c - t * g.l2Entries);
      else entryFor(c);
    }
    if (kind !== ClusterKind.Data) return;
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === first) last[1] += count;
    else runs.push([first, count]);
  }, signal);
  return runs;
}

const changed = () => new QcowError('QCOW_IO', 'the source changed while it was being streamed (its allocation differs between passes)');

async function writeQcow2Stream(sources: BlockDevice[], sink: ChunkSink, options: WriteStreamOptions): Promise<WriteStreamResult> {
  const shape = qcow2Shape(sources, options);
  const { cs, g, size, l1Entries } = shape;
  // --- pass one: what is allocated, hence where everything goes ---
  const plan = await planClusters(sources, cs, g.l2Coverage, l1Entries, shape.rules, options.signal);
  if (options.compress) return writeCompressedQcow2(sources, sink, options, shape, plan);
  const fixed = 1 + shape.l1Clusters + plan.tables + plan.dataClusters;
  const rc = refcountClusters(fixed, cs, shape.s.refcountBits);
  const clusters = fixed + rc.tableClusters + rc.blocks;
  // Each L2 table sits just before the data it maps.
  const tableAt = new Float64Array(l1Entries);
  let cursor = (1 + rc.tableClusters + rc.blocks + shape.l1Clusters) * cs;
  for (let t = 0; t < l1Entries; t++) {
    if (!plan.hasTable[t]) continue;
    tableAt[t] = cursor;
    cursor += cs * (1 + plan.dataPerTable[t]!);
  }
  const out = counting(sink);
  await putMetadata(out.put, shape, rc, clusters, () => 1, tableAt);

  // --- pass two: each L2 table, then its data ---
  const src = new ConcatSource(sources);
  const chunk = Math.max(cs, Math.floor((options.chunkSize ?? 2 * 1024 * 1024) / cs) * cs);
  const parallel = options.parallel ?? 4;
  for (let t = 0; t < l1Entries; t++) {
    throwIfAborted(options.signal);
    const to = Math.min(size, (t + 1) * g.l2Coverage);
    if (!plan.hasTable[t]) {
      options.onProgress?.(to, size);
      continue;
    }
    const l2 = new Uint8Array(cs);
    let host = tableAt[t]! + cs;
    const runs = await fillTable(src, shape, t, l2, (c) => {
      setCopiedNormalEntry(l2, c - t * g.l2Entries, host);
      host += cs;
    }, options.signal);
    if ((host - tableAt[t]! - cs) / cs !== plan.dataPerTable[t]) throw changed();
    await out.put(l2);
    for (const [first, count] of runs) {
      const start = first * cs;
      const end = Math.min(size, (first + count) * cs);
      if (!out.put.fromStore) {
        await copyRange(src, start, end - start, { chunk, parallel, padTo: cs, signal: options.signal }, async (buf, at) => {
          await out.put(buf);
          options.onProgress?.(at, size);
        });
        continue;
      }
      await sendRange(src, out.put, start, end, { chunk, parallel, signal: options.signal }, (at) => options.onProgress?.(at, size));
      // The image's last cluster, when the image ends inside it: zeros up to the cluster's end.
      if (end < (first + count) * cs) await out.put(new Uint8Array((first + count) * cs - end));
    }
    options.onProgress?.(to, size);
  }
  if (out.bytes() !== clusters * cs) throw new QcowError('QCOW_IO', `internal: streamed ${out.bytes()} bytes where the plan has ${clusters * cs}`);
  return { bytes: out.bytes() };
}

/**
 * Where compressed clusters go in the compressed region, relative to its (cluster-aligned) start:
 * back to back as qemu packs them, each counted in every host cluster its sectors touch (as
 * qemu-img check counts them), and moved to the next cluster when a count would overflow the
 * refcount width. Deterministic: the layout pass and the writing passes run it alike.
 */
class Packer {
  private pos = 0;
  constructor(
    private readonly cs: number,
    private readonly maxCount: number,
    private readonly counts?: number[],
  ) {}
  get end(): number {
    return this.pos;
  }
  /** Place `length` bytes; returns their offset and the extra 512-byte sectors the descriptor names. */
  place(length: number): { at: number; sectors: number } {
    for (;;) {
      const at = this.pos;
      const sectors = Math.floor((at + length - 1) / 512) - Math.floor(at / 512);
      const spanEnd = Math.floor(at / 512) * 512 + (sectors + 1) * 512;
      const first = Math.floor(at / this.cs);
      const last = Math.floor((spanEnd - 1) / this.cs);
      if (this.counts && this.pos % this.cs !== 0) {
        let fits = true;
        for (let c = first; c <= last; c++) if ((this.counts[c] ?? 0) + 1 > this.maxCount) fits = false;
        if (!fits) {
          this.pos = (first + 1) * this.cs;
          continue;
        }
      }
      if (this.counts) for (let c = first; c <= last; c++) this.counts[c] = (this.counts[c] ?? 0) + 1;
      this.pos = at + length;
      return { at, sectors };
    }
  }
}

/**
 * Compressed output. A compressed cluster's place in the file depends on the sizes of all before
 * it, which are known only once they are compressed, yet the tables that point at them come first
 * in the stream. So the clusters are compressed once, in guest order, into a spill (memory or a
 * temporary file of the compressed size), and the image is written after: metadata, L2 tables,
 * the clusters that did not shrink (stored plain, as qemu stores them), then the packed compressed
 * region. Trade-off, measured in docs/performance.md: one extra write and read of the compressed
 * bytes (small next to compressing them), against compressing twice or holding them in memory.
 */
async function writeCompressedQcow2(
  sources: BlockDevice[],
  sink: ChunkSink,
  options: WriteStreamOptions,
  shape: Qcow2Shape,
  plan: Awaited<ReturnType<typeof planClusters>>,
): Promise<WriteStreamResult> {
  const { s, cs, g, size, l1Entries } = shape;
  const spill = options.spill ?? memorySpill();
  const zstd = s.compressionType === COMPRESSION_ZSTD;
  const compress = zstd ? zstdCompress : deflateRaw;
  const lengths = new Uint32Array(plan.dataClusters);
  const chunk = Math.max(cs, Math.floor((options.chunkSize ?? 2 * 1024 * 1024) / cs) * cs);
  const parallel = options.parallel ?? 4;
  try {
    // --- pass two: compress every data cluster into the spill, in guest order ---
    let k = 0;
    {
      const src = new ConcatSource(sources);
      const runs: [number, number][] = [];
      await walkClusters(src, 0, size, cs, shape.rules, (first, count, kind) => {
        if (kind !== ClusterKind.Data) return;
        const last = runs[runs.length - 1];
        if (last && last[0] + last[1] === first) last[1] += count;
        else runs.push([first, count]);
      }, options.signal);
      for (const [first, count] of runs) {
        const start = first * cs;
        // Each chunk's clusters are compressed as soon as it is read (several chunks at once, on
        // the codec threads); the results reach the spill in guest order.
        const compressChunk = async (buf: Uint8Array) => {
          const packed = await Promise.all(Array.from({ length: buf.length / cs }, (_, i) => compress(buf.subarray(i * cs, (i + 1) * cs))));
          // As qemu: a cluster that does not shrink is stored as it is.
          return packed.map((p, i) => (p.length >= cs ? buf.subarray(i * cs, (i + 1) * cs) : p));
        };
        await copyRange(src, start, Math.min(size, (first + count) * cs) - start, { chunk, parallel, padTo: cs, signal: options.signal, prepare: compressChunk }, async (stored, end) => {
          for (const c of stored) {
            if (k >= lengths.length) throw changed();
            lengths[k++] = c.length;
            await spill.append(c);
          }
          options.onProgress?.(Math.min(end, size) / 2, size);
        });
      }
    }
    if (k !== plan.dataClusters) throw changed();

    // --- layout ---
    let plain = 0;
    const counts: number[] = [];
    const packer = new Packer(cs, maxRefcount(s.refcountBits), counts);
    for (let i = 0; i < lengths.length; i++) {
      if (lengths[i] === cs) plain++;
      else packer.place(lengths[i]!);
    }
    const regionClusters = Math.ceil(packer.end / cs);
    const fixed = 1 + shape.l1Clusters + plan.tables + plain + regionClusters;
    const rc = refcountClusters(fixed, cs, s.refcountBits);
    const clusters = fixed + rc.tableClusters + rc.blocks;
    const tablesAt = (1 + rc.tableClusters + rc.blocks + shape.l1Clusters) * cs;
    const plainAt = tablesAt + plan.tables * cs;
    const regionAt = plainAt + plain * cs;
    const tableAt = new Float64Array(l1Entries);
    for (let t = 0, n = 0; t < l1Entries; t++) if (plan.hasTable[t]) tableAt[t] = tablesAt + n++ * cs;
    const regionFirst = regionAt / cs;
    const out = counting(sink);
    await putMetadata(out.put, shape, rc, clusters, (c) => (c < regionFirst ? 1 : (counts[c - regionFirst] ?? 0)), tableAt);

    // --- the L2 tables (a third walk of the allocation) ---
    const src = new ConcatSource(sources);
    const places = new Packer(cs, maxRefcount(s.refcountBits), []);
    let d = 0;
    let plainIndex = 0;
    for (let t = 0; t < l1Entries; t++) {
      throwIfAborted(options.signal);
      if (!plan.hasTable[t]) continue;
      const l2 = new Uint8Array(cs);
      await fillTable(src, shape, t, l2, (c) => {
        const i = c - t * g.l2Entries;
        const len = lengths[d++];
        if (len === undefined) throw changed();
        if (len === cs) {
          const host = plainAt + plainIndex++ * cs;
          setCopiedNormalEntry(l2, i, host);
          return;
        }
        // The region starts on a cluster boundary: the packer's sector count is the descriptor's.
        const { at } = places.place(len);
        setL2Entry(l2, i, 8, encodeCompressedDescriptor(regionAt + at, len, s.clusterBits));
      }, options.signal);
      await out.put(l2);
    }
    if (d !== lengths.length) throw changed();

    // --- plain clusters, then the compressed region, both from the spill ---
    let spillAt = 0;
    for (let i = 0; i < lengths.length; spillAt += lengths[i++]!) {
      if (lengths[i] !== cs) continue;
      const buf = new Uint8Array(cs);
      await spill.read(spillAt, buf);
      await out.put(buf);
    }
    const again = new Packer(cs, maxRefcount(s.refcountBits), []);
    let window = new Uint8Array(chunk);
    let windowAt = 0; // region offset of window[0]
    spillAt = 0;
    for (let i = 0; i < lengths.length; spillAt += lengths[i++]!) {
      const len = lengths[i]!;
      if (len === cs) continue;
      const { at } = again.place(len);
      // Flush whole windows the next cluster starts beyond.
      while (at >= windowAt + window.length) {
        await out.put(window);
        windowAt += window.length;
        window = new Uint8Array(chunk);
      }
      let into = at - windowAt;
      let done = 0;
      while (done < len) {
        const n = Math.min(len - done, window.length - into);
        await spill.read(spillAt + done, window.subarray(into, into + n));
        done += n;
        if (done < len) {
          await out.put(window);
          windowAt += window.length;
          window = new Uint8Array(chunk);
          into = 0;
        }
      }
      options.onProgress?.(size / 2 + Math.min(size / 2, ((i + 1) / lengths.length) * (size / 2)), size);
    }
    const regionBytes = regionClusters * cs;
    if (windowAt < regionBytes) await out.put(window.subarray(0, regionBytes - windowAt));
    options.onProgress?.(size, size);
    if (out.bytes() !== clusters * cs) throw new QcowError('QCOW_IO', `internal: streamed ${out.bytes()} bytes where the plan has ${clusters * cs}`);
    return { bytes: out.bytes() };
  } finally {
    await spill.close();
  }
}
