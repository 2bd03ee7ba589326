/**
 * Read a qcow2 image front to back from a stream (a pipe, an HTTP body without Range support) and
 * write its guest content into a target, in one pass.
 *
 * Each byte of the file is looked at once, as it arrives. What a byte is becomes known from what
 * came before it: the header names the L1 and refcount tables, the L1 names the L2 tables, an L2
 * table names its data clusters. Images laid out by qemu-img (convert, or create and then guest
 * writes) and by qcow have every table before the data it maps, so nothing waits. A cluster whose
 * role is not known yet when it arrives is kept (memory, bounded by `bufferBytes`) in case a later
 * table names it, unless its refcount says it is free; when every L2 table has arrived nothing can
 * name it any more and it is dropped. Past the budget the conversion stops with one line saying
 * how much to allow.
 *
 * Memory: the budget, the L1 table, the refcount blocks seen (2 bytes per file cluster with the
 * default width), a window of three clusters, and one bit per guest cluster (what the image
 * itself decides, for backing files and -n targets).
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, corrupt, throwIfAborted } from '../core/errors.js';
import { decodeHeader, peekClusterBits, COMPRESSION_ZSTD, type Qcow2Header } from '../formats/qcow2/header.js';
import { INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, checkIncompatibleFeatures, hasFeature } from '../formats/qcow2/features.js';
import { decodeRefcountTable, getRefcount, entriesPerBlock } from '../formats/qcow2/refcount.js';
import { qcow2Geometry, l1EntriesFor, MAX_L1_BYTES } from '../formats/qcow2/layout.js';
import { l1TableOffset } from '../formats/qcow2/l1-entry.js';
import { decodeL2Entry, subclusterKind, type ClusterDescriptor, type L2Context } from '../formats/qcow2/l2-entry.js';
import { decompressCluster } from '../formats/qcow2/compressed.js';
import { openEncryption, type Qcow2Encryption } from '../formats/qcow2/encryption.js';
import type { ByteStore } from '../storage/types.js';
import type { Spill } from './spill.js';
import type { ClusterReader } from './cluster-reader.js';
import { GatheredWrites } from './gathered-writes.js';

/** Consecutive data clusters are taken from the reader as one piece up to this many bytes. */
const RUN_BYTES = 1024 * 1024;

/** What the image is, from its header: the target is made from this before any data arrives. */
export interface StreamImageInfo {
  format: 'qcow2' | 'qcow';
  size: number;
  clusterSize: number;
  /** Subclusters: the image decides only some of a cluster (not tracked for -n or backing files). */
  extendedL2: boolean;
  backingFile?: string;
  backingFormat?: string;
}

export interface StreamReadOptions {
  /** Bytes of clusters kept while their role is unknown. Default 64 MiB. */
  bufferBytes?: number;
  /** The password of an encrypted image (legacy AES or LUKS). */
  password?: string;
  /** Where held clusters go once `bufferBytes` of memory is used (a temporary file), and how much it may take. */
  spill?: { store: Spill; limit: number };
  signal?: AbortSignal;
  /** Bytes of the stream consumed, and its length when known. */
  onProgress?: (bytesIn: number) => void;
}

export interface StreamReadResult {
  bytesIn: number;
  /** The most bytes held at once while their role was unknown. */
  peakBuffered: number;
  /** Guest clusters the image itself decides (data or zeros); the rest reads from its backing file. */
  decided: (cluster: number) => boolean;
  info: StreamImageInfo;
}

type Want =
  | { kind: 'l1'; index: number }
  | { kind: 'reftable'; index: number }
  | { kind: 'refblock'; block: number }
  | { kind: 'luks'; index: number }
  | { kind: 'l2'; guest: number }
  | { kind: 'data'; guest: number; host: number; alloc: number }
  | { kind: 'compressed'; guest: number; host: number; bound: number };

/**
 * Convert the qcow2 image arriving on `reader`: `openTarget` receives the header's facts and gives
 * the device to write into (fresh, or an existing one); data is written as it arrives.
 */
export async function readQcow2Stream(
  reader: ClusterReader,
  openTarget: (info: StreamImageInfo) => Promise<BlockDevice>,
  options: StreamReadOptions = {},
): Promise<StreamReadResult & { target: BlockDevice }> {
  const budget = options.bufferBytes ?? 64 * 1024 * 1024;
  const first = await reader.take(512);
  if (first.length < 104) throw new QcowError('QCOW_CORRUPT', `the stream ended after ${first.length} bytes, inside the qcow2 header`);
  const cs = 2 ** peakClusterBitsSafe(first);
  const head = new Uint8Array(cs);
  head.set(first);
  const rest = await reader.take(cs - first.length);
  head.set(rest, first.length);
  if (reader.offset < cs) throw new QcowError('QCOW_CORRUPT', `the stream ended after ${reader.offset} bytes, inside the qcow2 header cluster`);
  const h = decodeHeader(head);
  checkIncompatibleFeatures(h);
  if (h.cryptMethod !== 0 && options.password === undefined) throw new QcowError('QCOW_NEED_PASSWORD', 'image is encrypted: a password is required (--password-file)');
  if (h.cryptMethod !== 0 && h.cryptMethod !== 1 && h.cryptMethod !== 2) throw new QcowError('QCOW_UNSUPPORTED', `unknown encryption method ${h.cryptMethod}`);
  if (hasFeature(h.incompatibleFeatures, INCOMPAT_DATA_FILE)) throw new QcowError('QCOW_UNSUPPORTED', 'an image with an external data file cannot be read from a stream (its data is not in the stream)');
  const extendedL2 = hasFeature(h.incompatibleFeatures, INCOMPAT_EXTL2);
  const g = qcow2Geometry(h.clusterBits, extendedL2);
  if (h.l1Size * 8 > MAX_L1_BYTES || h.l1Size < l1EntriesFor(h.size, g)) throw corrupt(`L1 table of ${h.l1Size} entries for a ${h.size}-byte image`);
  const info: StreamImageInfo = { format: 'qcow2', size: h.size, clusterSize: cs, extendedL2, backingFile: h.backingFile, backingFormat: h.backingFormat };
  if (extendedL2 && h.backingFile !== undefined) throw new QcowError('QCOW_UNSUPPORTED', 'an image with extended L2 entries and a backing file cannot be read from a stream yet');
  const target = await openTarget(info);
  const state = new StreamState(h, g, cs, budget, target, reader, extendedL2, options.signal, options.spill);
  if (h.cryptMethod !== 0) await state.setUpEncryption(head, options.password!);
  try {
    await state.run(reader, options.onProgress);
  } finally {
    await state.settle();
  }
  return { bytesIn: reader.offset, peakBuffered: state.peakBuffered, decided: (c) => state.isDecided(c), info, target };
}

function peakClusterBitsSafe(head: Uint8Array): number {
  const bits = peekClusterBits(head);
  if (!(bits >= 9 && bits <= 21)) throw corrupt(`cluster_bits ${bits} is out of range (9..21)`);
  return bits;
}

class StreamState {
  /** Wants by the file cluster that holds their first byte. */
  private readonly wants = new Map<number, Want[]>();
  /** L2 tables and metadata still to come (when 0 and no data is wanted, the rest is irrelevant). */
  private tablesPending = 0;
  private dataPending = 0;
  /** Clusters kept while their role is unknown. */
  private readonly kept = new Map<number, Uint8Array>();
  private keptBytes = 0;
  /** Held clusters moved to the spill: cluster -> offset in it. */
  private readonly spilled = new Map<number, number>();
  peakBuffered = 0;
  /** The last three clusters (compressed data may run across into the next ones). */
  private readonly window = new Map<number, Uint8Array>();
  private readonly refblocks = new Map<number, Uint8Array>();
  private readonly decided: Uint8Array;
  /** Where the guest data goes. */
  private readonly out: GatheredWrites;
  private readonly ctx: L2Context;
  /** Encrypted images: the cipher, once known (LUKS: once its header area has arrived). */
  private encryption: Qcow2Encryption | undefined;
  private luksArea: Uint8Array[] | undefined;
  private luksMissing = 0;
  private password: string | undefined;

  constructor(
    private readonly h: Qcow2Header,
    private readonly g: ReturnType<typeof qcow2Geometry>,
    private readonly cs: number,
    private readonly budget: number,
    target: BlockDevice,
    reader: ClusterReader,
    extendedL2: boolean,
    private readonly signal?: AbortSignal,
    private readonly spill?: { store: Spill; limit: number },
  ) {
    this.ctx = { clusterBits: h.clusterBits, extendedL2, externalDataFile: false };
    this.out = new GatheredWrites(target, reader);
    this.decided = new Uint8Array(Math.ceil(Math.ceil(h.size / cs) / 8));
    const l1Clusters = Math.ceil((h.l1Size * 8) / cs);
    for (let i = 0; i < l1Clusters; i++) this.want(h.l1TableOffset + i * cs, { kind: 'l1', index: i }, true);
    const rtClusters = h.refcountTableClusters;
    for (let i = 0; i < rtClusters && i < 256; i++) this.want(h.refcountTableOffset + i * cs, { kind: 'reftable', index: i }, false);
  }

  /**
   * Legacy AES: the key comes from the password at once. LUKS: the header area (right after the
   * image's first metadata clusters) must arrive first; its clusters are wanted like tables.
   */
  async setUpEncryption(head: Uint8Array, password: string): Promise<void> {
    this.password = password;
    if (this.h.cryptMethod === 1) {
      this.encryption = await openEncryption(headerOnlyStore(head), this.h, Number.MAX_SAFE_INTEGER, { password });
      return;
    }
    const fde = this.h.fde;
    if (!fde || fde.offset % this.cs !== 0 || fde.offset === 0 || fde.length === 0 || fde.length > 64 * 1024 * 1024) {
      throw corrupt('LUKS-encrypted image without a usable full disk encryption header area');
    }
    const clusters = Math.ceil(fde.length / this.cs);
    this.luksArea = new Array<Uint8Array>(clusters);
    this.luksMissing = clusters;
    for (let i = 0; i < clusters; i++) this.want(fde.offset + i * this.cs, { kind: 'luks', index: i }, true);
  }

  /** Decrypt a data cluster's bytes in place of a copy (whole 512-byte sectors, as stored). */
  private async decrypted(cluster: Uint8Array, host: number, guest: number): Promise<Uint8Array> {
    const enc = this.encryption;
    if (!enc) throw corrupt(`encrypted data at 0x${host.toString(16)} arrived before the LUKS header area`);
    return enc.cipher().decrypt(cluster, (enc.ivFromHostSector ? host : guest) / 512);
  }

  isDecided(c: number): boolean {
    return ((this.decided[c >> 3]! >> (c & 7)) & 1) === 1;
  }

  private decide(c: number): void {
    this.decided[c >> 3]! |= 1 << (c & 7);
  }

  /** Note that the bytes at file offset `at` are wanted; `table`: the conversion needs them. */
  private want(at: number, w: Want, table: boolean): void {
    if (at % 1 !== 0 || at < 0) throw corrupt(`table offset ${at} is invalid`);
    const c = Math.floor(at / this.cs);
    const list = this.wants.get(c);
    if (list) list.push(w);
    else this.wants.set(c, [w]);
    if (table) this.tablesPending++;
    if (w.kind === 'data' || w.kind === 'compressed') this.dataPending++;
  }

  async run(reader: ClusterReader, onProgress?: (n: number) => void): Promise<void> {
    // Cluster 0 (the header) is done; the rest of the file, cluster by cluster.
    const cs = this.cs;
    if (reader.retain < 2) throw new RangeError('the qcow2 stream reader looks back two clusters: its reader must keep them');
    for (let c = 1; ; c++) {
      throwIfAborted(this.signal);
      if (this.out.failure !== undefined) throw this.out.failure;
      if (this.tablesPending === 0 && this.dataPending === 0) {
        // Everything the image maps has arrived: the rest (refcounts, snapshots, free space)
        // does not change the guest's content. Read on a while, so a writer that sends the whole
        // file does not see a broken pipe, but not forever: a stream may never end.
        const stopAt = reader.offset + Math.max(this.budget, 64 * 1024 * 1024);
        while (reader.offset < stopAt && (await reader.take(1 << 20)).length > 0) onProgress?.(reader.offset);
        return;
      }
      const run = this.dataRun(c, reader.offset);
      if (run > 1) {
        const piece = await reader.take(run * cs);
        if (piece.length === run * cs) {
          onProgress?.(reader.offset);
          this.dataClusters(c, run, piece);
          c += run - 1;
          await this.out.backPressure();
          continue;
        }
        // The stream ended inside the run: its clusters one by one, as below, for the same checks
        // and messages.
        for (let i = 0; ; i++, c++) {
          const bytes = piece.subarray(i * cs, (i + 1) * cs);
          if (bytes.length === 0) return this.ended(c);
          if (!(await this.cluster(c, bytes, reader.offset))) return;
        }
      }
      const bytes = await reader.take(cs);
      onProgress?.(reader.offset);
      if (bytes.length === 0) return this.ended(c);
      if (!(await this.cluster(c, bytes, reader.offset))) return;
      await this.out.backPressure();
    }
  }

  /**
   * File cluster `c` has arrived (`bytes`, short at the stream's end, which is at `streamEnd` then):
   * false when the stream has ended with it.
   */
  private async cluster(c: number, bytes: Uint8Array, streamEnd: number): Promise<boolean> {
    const cs = this.cs;
    // qemu writes data clusters whole (with subclusters, up to the last one written): one cut
    // short of that means the stream ended early.
    if (bytes.length < cs && this.wants.get(c)?.some((w) => w.kind === 'data' && bytes.length < this.bytesNeeded(w.alloc))) {
      throw new QcowError('QCOW_CORRUPT', `the stream ended at ${streamEnd} bytes, inside a data cluster the image maps`);
    }
    const cluster = bytes.length === cs ? bytes : padded(bytes, cs);
    this.window.set(c, cluster);
    this.window.delete(c - 3);
    await this.arrived(c, cluster);
    // Compressed data that started up to two clusters back may end in this one.
    await this.finishCompressed(c);
    if (bytes.length < cs) {
      await this.ended(c + 1);
      return false;
    }
    return true;
  }

  /**
   * How many clusters from `c` on are each wanted as plain data only, for consecutive guest
   * clusters, and lie in the reader's current slab (up to the next MiB of the stream, so that
   * taking them together copies nothing): they are taken and written as one piece. 0 or 1: take
   * cluster `c` alone. Not for encrypted images, subclusters, or while compressed data is pending.
   */
  private dataRun(c: number, offset: number): number {
    const cs = this.cs;
    if (cs >= RUN_BYTES || this.ctx.extendedL2 || this.h.cryptMethod !== 0 || this.pendingCompressed.length > 0) return 0;
    const most = (RUN_BYTES - (offset % RUN_BYTES)) / cs;
    let guest = -1;
    let n = 0;
    for (; n < most; n++) {
      const list = this.wants.get(c + n);
      if (!list || list.length !== 1) break;
      const w = list[0]!;
      if (w.kind !== 'data' || (n > 0 && w.guest !== guest + cs) || w.guest + cs > this.h.size) break;
      guest = w.guest;
    }
    return n;
  }

  /** The `n` clusters from `c` on, which {@link dataRun} found wanted as consecutive data, in `piece`. */
  private dataClusters(c: number, n: number, piece: Uint8Array): void {
    const cs = this.cs;
    const guest = (this.wants.get(c)![0] as Extract<Want, { kind: 'data' }>).guest;
    for (let i = 0; i < n; i++) this.wants.delete(c + i);
    this.dataPending -= n;
    // The window holds the last three clusters, as when they come one at a time.
    for (let i = Math.max(0, n - 3); i < n; i++) this.window.set(c + i, piece.subarray(i * cs, (i + 1) * cs));
    for (let k = c - 3; k < c + n - 3; k++) this.window.delete(k);
    this.out.write(guest, piece);
  }

  /** Bytes of a data cluster that hold the image's data: all of it, or up to its last allocated subcluster. */
  private bytesNeeded(alloc: number): number {
    if (!this.ctx.extendedL2) return this.cs;
    return (32 - Math.clz32(alloc)) * this.g.subclusterSize;
  }

  /** The stream ended before cluster `c`: whatever is still wanted lies past its end. */
  private async ended(c: number): Promise<void> {
    const end = c * this.cs;
    // Compressed clusters whose stored length runs past the end: what arrived is all there is.
    for (const w of this.pendingCompressed.splice(0)) await this.readCompressed(w, end);
    for (const [wc, list] of this.wants) {
      for (const w of list) {
        // A file cut short reads as zeros there (qemu), but a stream that ends before data its
        // tables map has most likely been cut: say so rather than fill the gap with zeros.
        if (w.kind === 'data') throw new QcowError('QCOW_CORRUPT', `the stream ended at ${end} bytes, before data the image maps at 0x${w.host.toString(16)}`);
        if (w.kind === 'compressed') {
          // Its stored length is an upper bound that may run past the end: use what arrived.
          if (w.host < end) await this.readCompressed(w, end);
          else throw corrupt(`the stream ended at ${end} bytes, before the compressed cluster at 0x${w.host.toString(16)}`);
          continue;
        }
        if (w.kind === 'l1' || w.kind === 'l2') throw new QcowError('QCOW_CORRUPT', `the stream ended at ${end} bytes, before the ${w.kind === 'l1' ? 'L1' : 'L2'} table at 0x${(wc * this.cs).toString(16)}`);
      }
    }
    this.wants.clear();
  }

  private async arrived(c: number, cluster: Uint8Array): Promise<void> {
    const list = this.wants.get(c);
    if (!list) {
      await this.keep(c, cluster);
      return;
    }
    this.wants.delete(c);
    for (const w of list) await this.use(w, c, cluster);
  }

  /** A cluster nobody has named yet: free ones are dropped, others kept while a table may name them. */
  private async keep(c: number, cluster: Uint8Array): Promise<void> {
    if (this.tablesPending === 0) return;
    if (this.refcountOf(c) === 0) return;
    if (this.keptBytes + this.cs <= this.budget) {
      // A copy: the reader reuses the memory of clusters that have left the window.
      this.kept.set(c, cluster.slice());
      this.keptBytes += this.cs;
      this.peakBuffered = Math.max(this.peakBuffered, this.keptBytes + this.spilled.size * this.cs);
      return;
    }
    // Memory is full: the spill folder, up to its own limit.
    const spill = this.spill;
    if (spill && spill.store.size + this.cs <= spill.limit) {
      this.spilled.set(c, spill.store.size);
      await spill.store.append(cluster);
      this.peakBuffered = Math.max(this.peakBuffered, this.keptBytes + this.spilled.size * this.cs);
      return;
    }
    throw new QcowError(
      'QCOW_UNSUPPORTED',
      spill
        ? `this image's layout needs more than ${this.budget} bytes of memory and ${spill.limit} bytes of spill for clusters held until the tables that name them arrive: allow more (--stream-buffer SIZE, --stream-spill-size SIZE) or give qcow the file itself`
        : `this image's layout needs more than ${this.budget} bytes of clusters held until the tables that name them arrive: allow more (--stream-buffer SIZE, or --stream-spill DIR) or give qcow the file itself`,
    );
  }

  /** 0 when the refcount blocks seen so far say the cluster is free; -1 when unknown. */
  private refcountOf(c: number): number {
    const per = entriesPerBlock(this.cs, 2 ** this.h.refcountOrder);
    const block = this.refblocks.get(Math.floor(c / per));
    return block ? getRefcount(block, c % per, 2 ** this.h.refcountOrder) : -1;
  }

  /** The bytes of file cluster `c` if they have arrived and are still held (in memory or spilled). */
  private async held(c: number): Promise<Uint8Array | undefined> {
    const mem = this.window.get(c) ?? this.kept.get(c);
    if (mem) return mem;
    const at = this.spilled.get(c);
    if (at === undefined || !this.spill) return undefined;
    const buf = new Uint8Array(this.cs);
    await this.spill.store.read(at, buf);
    return buf;
  }

  private isHeld(c: number): boolean {
    return this.window.has(c) || this.kept.has(c) || this.spilled.has(c);
  }

  /** A want for bytes that already went by: served from what is held, or an error. */
  private async wantOrServe(at: number, w: Want, table: boolean, current: number): Promise<void> {
    const c = Math.floor(at / this.cs);
    if (c > current) {
      this.want(at, w, table);
      return;
    }
    const cluster = await this.held(c);
    if (!cluster) throw corrupt(`a table points back to 0x${at.toString(16)}, which the stream has already passed (the image is not laid out front to back)`);
    if (table) this.tablesPending++;
    if (w.kind === 'data' || w.kind === 'compressed') this.dataPending++;
    await this.use(w, c, cluster);
  }

  private async use(w: Want, c: number, cluster: Uint8Array): Promise<void> {
    const cs = this.cs;
    switch (w.kind) {
      case 'reftable': {
        const entries = cs / 8;
        const offsets = decodeRefcountTable(cluster, entries, cs);
        for (let i = 0; i < entries; i++) {
          const off = offsets[i]!;
          if (off !== 0) await this.wantOrServe(off, { kind: 'refblock', block: w.index * entries + i }, false, c);
        }
        return;
      }
      case 'refblock':
        this.refblocks.set(w.block, cluster.slice());
        return;
      case 'luks': {
        this.tablesPending--;
        this.luksArea![w.index] = cluster.slice();
        if (--this.luksMissing > 0) return;
        // The whole area is here: unlock it (the key derivation takes the time LUKS asks for).
        const fde = this.h.fde!;
        const area = this.luksArea!;
        const store = areaStore(area, fde.offset, this.cs);
        this.encryption = await openEncryption(store, this.h, fde.offset + area.length * this.cs, { password: this.password });
        this.luksArea = undefined;
        return;
      }
      case 'l1': {
        this.tablesPending--;
        const entries = Math.min(cs / 8, this.h.l1Size - w.index * (cs / 8));
        for (let i = 0; i < entries; i++) {
          const off = l1TableOffset(cluster, i);
          const guest = (w.index * (cs / 8) + i) * this.g.l2Coverage;
          if (off !== 0 && guest < this.h.size) await this.wantOrServe(off, { kind: 'l2', guest }, true, c);
        }
        this.dropKeptIfDone();
        return;
      }
      case 'l2':
        this.tablesPending--;
        await this.table(w.guest, cluster, c);
        this.dropKeptIfDone();
        return;
      case 'data': {
        this.dataPending--;
        if (this.h.cryptMethod !== 0) cluster = await this.decrypted(cluster, w.host, w.guest);
        if (this.ctx.extendedL2) {
          // Only the allocated subclusters hold the image's bytes.
          const sc = this.g.subclusterSize;
          for (let k = 0; k < this.g.subclustersPerCluster; k++) {
            if (!((w.alloc >>> k) & 1)) continue;
            const from = k * sc;
            const guest = w.guest + from;
            if (guest >= this.h.size) break;
            this.out.write(guest, cluster.subarray(from, Math.min(from + sc, this.h.size - w.guest)));
          }
          return;
        }
        this.out.write(w.guest, cluster.subarray(0, Math.min(cs, this.h.size - w.guest)));
        return;
      }
      case 'compressed':
        // Finished when the cluster holding its last byte arrives (finishCompressed).
        this.pendingCompressed.push(w);
        return;
    }
  }

  private readonly pendingCompressed: Extract<Want, { kind: 'compressed' }>[] = [];

  /** Compressed clusters whose bytes have all arrived by the end of cluster `c`. */
  private async finishCompressed(c: number): Promise<void> {
    const end = (c + 1) * this.cs;
    for (let i = 0; i < this.pendingCompressed.length; ) {
      const w = this.pendingCompressed[i]!;
      if (w.host + w.bound <= end) {
        this.pendingCompressed.splice(i, 1);
        await this.readCompressed(w, end);
      } else i++;
    }
  }

  private async readCompressed(w: Extract<Want, { kind: 'compressed' }>, end: number): Promise<void> {
    const n = Math.min(w.bound, end - w.host);
    const raw = new Uint8Array(n);
    for (let done = 0; done < n; ) {
      const at = w.host + done;
      const c = Math.floor(at / this.cs);
      const cluster = await this.held(c);
      if (!cluster) throw corrupt(`compressed cluster at 0x${w.host.toString(16)}: its bytes are no longer held`);
      const from = at - c * this.cs;
      const k = Math.min(this.cs - from, n - done);
      raw.set(cluster.subarray(from, from + k), done);
      done += k;
    }
    const data = await decompressCluster(raw, this.cs, this.h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib', w.host);
    this.dataPending--;
    this.out.write(w.guest, data.subarray(0, Math.min(this.cs, this.h.size - w.guest)));
  }

  /** An L2 table: name its data clusters; note which guest clusters the image decides. */
  private async table(guestBase: number, t: Uint8Array, current: number): Promise<void> {
    const cs = this.cs;
    for (let i = 0; i < this.g.l2Entries; i++) {
      const guest = guestBase + i * cs;
      if (guest >= this.h.size) break;
      const d = decodeL2Entry(t, i, this.ctx, this.entry);
      if (d.kind === 'unallocated' && !this.ctx.extendedL2) continue;
      const cluster = guest / cs;
      if (d.kind === 'compressed') {
        this.decide(cluster);
        const w: Want = { kind: 'compressed', guest, host: d.hostOffset, bound: d.compressedBound };
        const first = Math.floor(d.hostOffset / cs);
        if (first > current) this.want(d.hostOffset, w, false);
        else {
          // Already passed (in the window or kept): finish it once its last byte is here.
          if (!this.isHeld(first)) throw corrupt(`a table points back to 0x${d.hostOffset.toString(16)}, which the stream has already passed (the image is not laid out front to back)`);
          this.dataPending++;
          this.pendingCompressed.push(w);
          await this.finishCompressed(current);
        }
        continue;
      }
      if (this.ctx.extendedL2) {
        // Zero or unallocated subclusters read as zeros in a fresh target (no backing file here).
        if (d.kind === 'normal' || d.kind === 'zero-alloc') {
          let alloc = 0;
          for (let k = 0; k < this.g.subclustersPerCluster; k++) if (subclusterKind(d, k, true) === 'normal') alloc |= 1 << k;
          if (alloc !== 0) await this.wantOrServe(d.hostOffset, { kind: 'data', guest, host: d.hostOffset, alloc: alloc >>> 0 }, false, current);
        }
        continue;
      }
      this.decide(cluster);
      if (d.kind !== 'normal') continue;
      const w: Want = { kind: 'data', guest, host: d.hostOffset, alloc: 1 };
      // Data still to come (the usual case) is noted without an await per entry.
      if (d.hostOffset >= (current + 1) * cs) this.want(d.hostOffset, w, false);
      else await this.wantOrServe(d.hostOffset, w, false, current);
    }
  }

  /** The L2 entry being looked at (decoded in place: no garbage per entry). */
  private readonly entry: ClusterDescriptor = { kind: 'unallocated', hostOffset: 0, compressedBound: 0, allocBitmap: 0, zeroBitmap: 0, hi: 0, lo: 0 };

  /** With every table in, nothing can name a kept cluster any more. */
  private dropKeptIfDone(): void {
    if (this.tablesPending > 0) return;
    // Compressed data may still be wanted from kept clusters: keep those.
    const needed = new Set(this.pendingCompressed.flatMap((w) => [Math.floor(w.host / this.cs), Math.floor((w.host + w.bound - 1) / this.cs)]));
    for (const c of this.kept.keys()) {
      if (needed.has(c)) continue;
      this.kept.delete(c);
      this.keptBytes -= this.cs;
    }
    for (const c of this.spilled.keys()) if (!needed.has(c)) this.spilled.delete(c);
  }

  async settle(): Promise<void> {
    await this.out.settle();
  }
}

function padded(bytes: Uint8Array, n: number): Uint8Array {
  const out = new Uint8Array(n);
  out.set(bytes);
  return out;
}

/** A ByteStore that holds only the header cluster (legacy AES needs nothing else). */
function headerOnlyStore(head: Uint8Array): ByteStore {
  return areaStore([head], 0, head.length);
}

/** A read-only ByteStore over consecutive clusters starting at `offset` (the LUKS header area). */
function areaStore(clusters: Uint8Array[], offset: number, cs: number): ByteStore {
  const end = offset + clusters.length * cs;
  return {
    name: 'stream',
    readOnly: true,
    size: async () => end,
    async read(at, into) {
      if (at < offset || at + into.length > end) throw corrupt(`encryption header read at 0x${at.toString(16)} outside its area`);
      for (let done = 0; done < into.length; ) {
        const i = Math.floor((at + done - offset) / cs);
        const from = at + done - offset - i * cs;
        const n = Math.min(cs - from, into.length - done);
        into.set(clusters[i]!.subarray(from, from + n), done);
        done += n;
      }
      return into.length;
    },
    write: async () => {
      throw corrupt('read-only');
    },
    truncate: async () => undefined,
    flush: async () => undefined,
    close: async () => undefined,
  };
}
