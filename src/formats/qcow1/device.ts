/**
 * A qcow (version 1) image as a BlockDevice.
 *
 * Reads look each guest cluster up through L1 -> L2, join clusters whose host bytes run on into one
 * file read, send unallocated ranges to the backing image, inflate compressed clusters (never
 * decrypted, as in QEMU) and decrypt AES sectors.
 *
 * Writes run one at a time under a mutex (reads do not wait). Clusters that already hold normal
 * data are written in place. Every other touched cluster gets a new cluster at the end of the
 * file, filled with what the guest saw there before (the backing image, the inflated compressed
 * cluster, or zeros) and the new bytes; L2 tables are allocated at the end of the file too, in the
 * order QEMU allocates them. Crash safety comes from ordering: new clusters and new L2 tables
 * (already holding their entries) are written first; L2 entries in existing tables and L1 entries
 * for new tables are written only after a flush (on flush(), close(), or every 32 MiB), so a
 * crash can lose unflushed writes and leak space, never leave an entry pointing at unwritten bytes.
 */
import type { BlockExtent, ImageDescription, OpenOptions, PlainExtent, WriteOptions, ZeroOptions } from '../../core/block-device.js';
import { DeviceBase } from '../../core/device-base.js';
import { QcowError, corrupt, invalidArgument, unsupported } from '../../core/errors.js';
import { Mutex } from '../../core/mutex.js';
import { alignDown, alignUp, utf8, view } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';
import type { SectorCipher } from '../../crypto/types.js';
import { deflateRaw, inflateRaw } from '../../compress/lazy.js';
import { CRYPT_AES, HEADER_SIZE, decodeHeader, l1SizeOf, virtualSizeOf, type QcowHeader } from './header.js';
import { compressedEntry, decodeEntry, normalEntry, type ClusterEntry } from './l2-entry.js';
import { L2Cache } from './l2-cache.js';
import { FileSpace } from './file-space.js';
import { PendingLinks, encodeTable } from './links.js';

const SECTOR = 512;
/** Default memory for cached L2 tables. */
export const DEFAULT_L2_CACHE_BYTES = 1 << 20;
/** Writes are carried out in pieces of at most this many bytes (whole clusters). */
const WRITE_PIECE = 4 << 20;
/** Separate file reads in flight for one read request. */
const READ_PARALLEL = 8;

/** A run of guest bytes with one kind of mapping. Normal runs have contiguous host bytes. */
interface Piece {
  guest: number;
  length: number;
  entry: ClusterEntry;
  /** Normal clusters: the host offset of `guest`. */
  host?: number;
}

/** One cluster touched by a write. */
interface Touch {
  index: number;
  inCluster: number;
  length: number;
  /** Where the bytes come from in the caller's buffer. */
  dataOffset: number;
  entry: ClusterEntry;
}

/** What a write has allocated but not yet linked into the image. */
interface Batch {
  /** Bytes to write before the flush: new clusters and new L2 tables. */
  writes: { host: number; bytes: Uint8Array }[];
  /** L2 entries to set, by L1 index. */
  entries: Map<number, { index: number; value: bigint }[]>;
  /** L2 tables allocated by this batch, by L1 index. */
  newTables: Map<number, { offset: number; table: BigUint64Array }>;
}

/** Where the low and the high 32 bits of a 64-bit array element are, in 32-bit words (host order). */
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const LO = LITTLE_ENDIAN ? 0 : 1;
const HI = 1 - LO;

/**
 * An L2 table's big-endian bytes as entries, word by word: DataView's getBigUint64 per entry made
 * a BigInt for each (~200 instructions; 262144 entries per GiB of 4 KiB clusters).
 */
function decodeTable(raw: Uint8Array, entries: number): BigUint64Array {
  const table = new BigUint64Array(entries);
  const out = new Uint32Array(table.buffer);
  const dv = view(raw);
  for (let i = 0; i < entries; i++) {
    out[2 * i + HI] = dv.getUint32(8 * i);
    out[2 * i + LO] = dv.getUint32(8 * i + 4);
  }
  return table;
}

export class Qcow1Device extends DeviceBase {
  readonly format = 'qcow';
  readonly clusterSize: number;
  readonly header: QcowHeader;
  /** The backing file name as stored (no format is stored in qcow v1). */
  readonly backingName: string | undefined;
  private readonly clusterBits: number;
  private readonly l2Entries: number;
  private readonly l2Bytes: number;
  /** The L1 table as on disk (big-endian), kept whole in memory. */
  private readonly l1: Uint8Array;
  private readonly l1View: DataView;
  private readonly l2Cache: L2Cache;
  private readonly mutex = new Mutex();
  /** Compressed writes take the mutex in the order they were called (see writeCompressed). */
  private readonly compressOrder = new Mutex();
  private readonly cipher: SectorCipher | null;
  /** Where new clusters and tables go (the end of the file). */
  private readonly space: FileSpace;
  private lastInflated: { entry: bigint; data: Uint8Array } | null = null;
  /** Offsets of every L2 table, sorted: in-place writes must never land on one. */
  private readonly l2Offsets: number[] = [];
  /** Links set in memory but not yet on disk: index ranges of L2 tables (by offset) and of L1. */
  private readonly links = new PendingLinks();

  private constructor(store: ByteStore, readOnly: boolean, header: QcowHeader, l1: Uint8Array, backingName: string | undefined, cipher: SectorCipher | null, eof: number, cacheBytes: number) {
    super(store, virtualSizeOf(header), readOnly);
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.l2Entries = 2 ** header.l2Bits;
    this.l2Bytes = 8 * this.l2Entries;
    this.l1 = l1;
    this.l1View = view(l1);
    this.backingName = backingName;
    this.cipher = cipher;
    this.space = new FileSpace(store, eof, this.clusterSize);
    this.l2Cache = new L2Cache(this.l2Bytes, cacheBytes);
    for (let i = 0; i < l1.length; i += 8) {
      const hi = this.l1View.getUint32(i);
      const lo = this.l1View.getUint32(i + 4);
      // (offsets too large to be exact are refused when used)
      if ((hi !== 0 || lo !== 0) && hi < 2 ** 21) this.l2Offsets.push(hi * 2 ** 32 + lo);
    }
    this.l2Offsets.sort((a, b) => a - b);
  }

  static async open(store: ByteStore, options: OpenOptions = {}): Promise<Qcow1Device> {
    const fileSize = await store.size();
    const head = new Uint8Array(HEADER_SIZE);
    await store.read(0, head);
    const header = decodeHeader(head, fileSize);

    let backingName: string | undefined;
    if (header.backingFileSize > 0) {
      const raw = new Uint8Array(header.backingFileSize);
      await store.read(header.backingFileOffset, raw);
      // QEMU holds the name as a C string: a NUL ends it early.
      const nul = raw.indexOf(0);
      const name = utf8(nul < 0 ? raw : raw.subarray(0, nul));
      if (name !== '') backingName = name;
    }

    let cipher: SectorCipher | null = null;
    if (header.cryptMethod === CRYPT_AES) {
      if (options.password !== undefined) {
        const { legacyAesCipher } = await import('../../crypto/legacy-aes.js');
        cipher = await legacyAesCipher(options.password);
      }
      else if (!options.inspectOnly) throw new QcowError('QCOW_NEED_PASSWORD', 'image is encrypted (AES): a password is needed (--password-file FILE)');
    }

    const l1 = new Uint8Array(8 * l1SizeOf(header));
    await store.read(header.l1TableOffset, l1);

    const readOnly = options.readOnly ?? store.readOnly;
    const dev = new Qcow1Device(store, readOnly, header, l1, backingName, cipher, fileSize, options.cacheBytes ?? DEFAULT_L2_CACHE_BYTES);
    if (backingName !== undefined && options.openBacking) {
      // The format of the backing file is not recorded in qcow v1: the opener probes it.
      dev.backing = await options.openBacking(backingName, undefined);
    }
    return dev;
  }

  get encrypted(): boolean {
    return this.header.cryptMethod === CRYPT_AES;
  }

  // ---------------------------------------------------------------- lookup

  /** The L2 table offset in L1 entry `i`, or 0. */
  private l1Entry(i: number): number {
    const v = this.l1View.getBigUint64(8 * i);
    if (v === 0n) return 0;
    if (v > BigInt(Number.MAX_SAFE_INTEGER - this.l2Bytes)) throw corrupt(`L1 entry ${i}: L2 table offset 0x${v.toString(16)} is too large`, this.filename);
    return Number(v);
  }

  private l2Table(offset: number): Promise<BigUint64Array> {
    return this.l2Cache.get(offset, async (off) => {
      // Bytes past the end of the file read as zeros, as in QEMU (entries there are unallocated).
      const raw = new Uint8Array(this.l2Bytes);
      await this.store.read(off, raw);
      return decodeTable(raw, this.l2Entries);
    });
  }

  private decode(raw: bigint, index: number): ClusterEntry {
    try {
      return decodeEntry(raw, this.clusterBits);
    } catch (e) {
      if (e instanceof QcowError) {
        e.message = `guest cluster ${index}: ${e.message}`;
        e.file ??= this.filename;
      }
      throw e;
    }
  }

  /**
   * Calls `each` for every cluster of [offset, offset+length) in order, with its entry. With
   * `coarse`, a range without an L2 table comes as one call (n may then span many clusters).
   */
  private async forEachCluster(
    offset: number,
    length: number,
    each: (index: number, inCluster: number, n: number, entry: ClusterEntry) => void,
    coarse = false,
  ): Promise<void> {
    const cs = this.clusterSize;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      let index = Math.floor(pos / cs);
      const l1i = Math.floor(index / this.l2Entries);
      const l2Offset = this.l1Entry(l1i);
      const table = l2Offset ? await this.l2Table(l2Offset) : null;
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Entries * cs);
      if (!table && coarse) {
        each(index, pos - index * cs, tableEnd - pos, UNALLOCATED);
        pos = tableEnd;
        continue;
      }
      while (pos < tableEnd) {
        const inCluster = pos - index * cs;
        const n = Math.min(cs - inCluster, tableEnd - pos);
        const raw = table ? table[index % this.l2Entries]! : 0n;
        each(index, inCluster, n, raw === 0n ? UNALLOCATED : this.decode(raw, index));
        pos += n;
        index++;
      }
    }
  }

  private async entryOf(index: number): Promise<ClusterEntry> {
    const l2Offset = this.l1Entry(Math.floor(index / this.l2Entries));
    if (!l2Offset) return UNALLOCATED;
    const raw = (await this.l2Table(l2Offset))[index % this.l2Entries]!;
    return raw === 0n ? UNALLOCATED : this.decode(raw, index);
  }

  /**
   * The mapping of a guest range as runs: unallocated runs and host-contiguous normal runs joined.
   * Block status, reads and plainExtents all come here, so it reads the tables' entries as 32-bit
   * halves and steps over a run of normal clusters that follow each other in the file in one
   * inner loop: a BigInt per entry (reading one out of the table allocates it, and decodeEntry's
   * arithmetic) and a callback per cluster were most of a 1 GiB qcow -> raw convert's
   * instructions. Other entries are decoded as before.
   */
  private async pieces(offset: number, length: number): Promise<Piece[]> {
    const out: Piece[] = [];
    const cs = this.clusterSize;
    const end = offset + length;
    const unallocated = (guest: number, n: number) => {
      const last = out[out.length - 1];
      if (last?.entry.kind === 'unallocated') last.length += n;
      else out.push({ guest, length: n, entry: UNALLOCATED });
    };
    let pos = offset;
    while (pos < end) {
      let index = Math.floor(pos / cs);
      const l1i = Math.floor(index / this.l2Entries);
      const l2Offset = this.l1Entry(l1i);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Entries * cs);
      if (!l2Offset) {
        unallocated(pos, tableEnd - pos);
        pos = tableEnd;
        continue;
      }
      const table = await this.l2Table(l2Offset);
      const words = new Uint32Array(table.buffer, table.byteOffset, 2 * table.length);
      while (pos < tableEnd) {
        const inCluster = pos - index * cs;
        const k = index % this.l2Entries;
        const lo = words[2 * k + LO]!;
        const hi = words[2 * k + HI]!;
        if (lo === 0 && hi === 0) {
          unallocated(pos, Math.min(cs - inCluster, tableEnd - pos));
          pos = Math.min(tableEnd, (index + 1) * cs);
          index++;
          continue;
        }
        // Below 2^53 (so no compressed flag) and 512-aligned: what decodeEntry makes a normal entry.
        if (hi < 0x200000 && lo % 512 === 0) {
          const clusterHost = hi * 2 ** 32 + lo;
          // The clusters after it that are its neighbours in the file, in the same table.
          let next = index + 1;
          let expect = clusterHost + cs;
          for (let j = k + 1; next * cs < tableEnd && expect <= Number.MAX_SAFE_INTEGER && words[2 * j + HI]! * 2 ** 32 + words[2 * j + LO]! === expect; j++, next++) expect += cs;
          const runEnd = Math.min(tableEnd, next * cs);
          const host = clusterHost + inCluster;
          const last = out[out.length - 1];
          if (last?.entry.kind === 'normal' && last.host! + last.length === host) last.length += runEnd - pos;
          else out.push({ guest: pos, length: runEnd - pos, entry: { kind: 'normal', hostOffset: clusterHost }, host });
          pos = runEnd;
          index = next;
          continue;
        }
        const entry = this.decode(table[k]!, index);
        const n = Math.min(cs - inCluster, tableEnd - pos);
        const last = out[out.length - 1];
        if (entry.kind === 'normal') {
          const host = entry.hostOffset + inCluster;
          if (last?.entry.kind === 'normal' && last.host! + last.length === host) last.length += n;
          else out.push({ guest: pos, length: n, entry, host });
        } else {
          out.push({ guest: pos, length: n, entry });
        }
        pos += n;
        index++;
      }
    }
    return out;
  }

  // ---------------------------------------------------------------- read

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    const list = await this.pieces(offset, into.length);
    // Pieces that are not neighbours in the file are read several at a time.
    let next = 0;
    const worker = async () => {
      while (next < list.length) await this.readPiece(list[next++]!, offset, into);
    };
    await Promise.all(Array.from({ length: Math.min(READ_PARALLEL, list.length) }, worker));
  }

  private async readPiece(p: Piece, offset: number, into: Uint8Array): Promise<void> {
    const part = into.subarray(p.guest - offset, p.guest - offset + p.length);
    switch (p.entry.kind) {
      case 'unallocated':
        await this.readBacking(p.guest, part);
        break;
      case 'normal':
        await this.readNormal(p.host!, p.guest, part);
        break;
      case 'compressed': {
        const cluster = await this.inflate(p.entry);
        const inCluster = p.guest % this.clusterSize;
        part.set(cluster.subarray(inCluster, inCluster + p.length));
        break;
      }
    }
  }

  private async readNormal(host: number, guest: number, into: Uint8Array): Promise<void> {
    if (!this.encrypted) {
      await this.store.read(host, into);
      return;
    }
    const cipher = this.requireCipher();
    // Whole sectors: each is enciphered on its own with its guest sector number as IV.
    const start = alignDown(guest, SECTOR);
    const end = alignUp(guest + into.length, SECTOR);
    const sealed = new Uint8Array(end - start);
    await this.store.read(host - (guest - start), sealed);
    const plain = await cipher.decrypt(sealed, start / SECTOR);
    into.set(plain.subarray(guest - start, guest - start + into.length));
  }

  /** A compressed cluster, inflated (the most recent one is kept, as QEMU does). */
  private async inflate(entry: Extract<ClusterEntry, { kind: 'compressed' }>): Promise<Uint8Array> {
    const last = this.lastInflated;
    if (last && last.entry === entry.raw) return last.data;
    const packed = new Uint8Array(entry.compressedSize);
    // Checked before reading the file: the tail leaves memory only once it is in the file.
    if (!this.space.readTail(entry.hostOffset, packed)) await this.store.read(entry.hostOffset, packed);
    let data: Uint8Array;
    try {
      data = await inflateRaw(packed, this.clusterSize);
    } catch (e) {
      if (e instanceof QcowError) {
        e.message = `compressed cluster at 0x${entry.hostOffset.toString(16)} (${entry.compressedSize} bytes): ${e.message}`;
        e.file ??= this.filename;
      }
      throw e;
    }
    this.lastInflated = { entry: entry.raw, data };
    return data;
  }

  private requireCipher(): SectorCipher {
    if (!this.cipher) throw new QcowError('QCOW_NEED_PASSWORD', 'image is encrypted (AES): a password is needed to read or write its data', { file: this.filename });
    return this.cipher;
  }

  // ---------------------------------------------------------------- write

  protected async doWrite(offset: number, data: Uint8Array, _options: WriteOptions): Promise<void> {
    if (this.encrypted) this.requireCipher();
    await this.mutex.run(() => this.writeLocked(offset, data));
  }

  private async writeLocked(offset: number, data: Uint8Array): Promise<void> {
    // Pieces of whole clusters, so a huge request never needs a huge buffer at once.
    for (let done = 0; done < data.length; ) {
      const pos = offset + done;
      const n = Math.min(data.length - done, alignDown(pos + WRITE_PIECE, this.clusterSize) - pos);
      await this.writePiece(pos, data.subarray(done, done + n));
      done += n;
    }
  }

  private async writePiece(offset: number, data: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    const touches: Touch[] = [];
    await this.forEachCluster(offset, data.length, (index, inCluster, length, entry) => {
      touches.push({ index, inCluster, length, dataOffset: index * cs + inCluster - offset, entry });
    });

    // Clusters that hold normal data take the bytes in place; host neighbours are written together.
    const inPlace: { host: number; guest: number; start: number; end: number }[] = [];
    const batch = newBatch();
    for (const t of touches) {
      if (t.entry.kind === 'normal') {
        this.checkWritableCluster(t.entry.hostOffset, t.index);
        const host = t.entry.hostOffset + t.inCluster;
        const last = inPlace[inPlace.length - 1];
        if (last && last.end === t.dataOffset && last.host + (last.end - last.start) === host) last.end += t.length;
        else inPlace.push({ host, guest: t.index * cs + t.inCluster, start: t.dataOffset, end: t.dataOffset + t.length });
        continue;
      }
      // A new cluster: what the guest saw there before, with the new bytes over it.
      const bytes = await this.newClusterContent(t, data.subarray(t.dataOffset, t.dataOffset + t.length));
      await this.allocate(batch, t.index, bytes, 'normal');
    }
    // QEMU's qcow driver tells its file of each data write (blkdebug's write_aio event).
    this.store.debugEvent?.('write_aio');
    for (const r of inPlace) await this.writeInPlace(r.host, r.guest, data.subarray(r.start, r.end));
    await this.commit(batch);
  }

  /** A full cluster for `t`: its old content (backing, inflated, or zeros), the new bytes, enciphered. */
  private async newClusterContent(t: Touch, part: Uint8Array): Promise<Uint8Array> {
    const cs = this.clusterSize;
    const guest = t.index * cs;
    let cluster: Uint8Array;
    if (t.inCluster === 0 && t.length === cs) cluster = part.slice();
    else {
      if (t.entry.kind === 'compressed') cluster = (await this.inflate(t.entry)).slice();
      else {
        cluster = new Uint8Array(cs);
        // QEMU leaves the rest of the cluster zero here (it never copies from the backing file);
        // that would hide the backing image's bytes, so they are copied in (qcow1.md §6.3).
        if (this.backing) await this.readBacking(guest, cluster.subarray(0, Math.min(cs, this.size - guest)));
      }
      cluster.set(part, t.inCluster);
    }
    return this.cipher ? this.cipher.encrypt(cluster, guest / SECTOR) : cluster;
  }

  private async writeInPlace(host: number, guest: number, part: Uint8Array): Promise<void> {
    if (!this.cipher) {
      await this.store.write(host, part);
      return;
    }
    const start = alignDown(guest, SECTOR);
    const end = alignUp(guest + part.length, SECTOR);
    let plain: Uint8Array;
    if (start === guest && end === guest + part.length) plain = part;
    else {
      // A sector is the unit of encryption: merge the new bytes into the old sector contents.
      const sealed = new Uint8Array(end - start);
      await this.store.read(host - (guest - start), sealed);
      plain = await this.cipher.decrypt(sealed, start / SECTOR);
      plain.set(part, guest - start);
    }
    await this.store.write(host - (guest - start), await this.cipher.encrypt(plain, start / SECTOR));
  }

  /**
   * An in-place write must land inside the file's data area: never on the header or L1 table, and
   * never past the end of the file, where new clusters are allocated (an entry there is left by a
   * crash of a writer that links clusters before writing them, or by a hostile image).
   */
  private checkWritableCluster(host: number, index: number): void {
    const metadataEnd = this.header.l1TableOffset + this.l1.length;
    if (host < metadataEnd || host + this.clusterSize > this.space.end) {
      throw corrupt(
        `guest cluster ${index}: L2 entry points at 0x${host.toString(16)}, outside the data area (0x${metadataEnd.toString(16)}..0x${this.space.end.toString(16)}); refusing to write`,
        this.filename,
      );
    }
    // The last table starting before the cluster's end is the only one that can overlap it.
    const t = this.l2Offsets[upperBound(this.l2Offsets, host + this.clusterSize - 1) - 1];
    if (t !== undefined && t + this.l2Bytes > host) {
      throw corrupt(`guest cluster ${index}: L2 entry 0x${host.toString(16)} overlaps the L2 table at 0x${t.toString(16)}; refusing to write`, this.filename);
    }
  }

  /** The L2 table that will hold the entry for L1 index `l1i`: existing, or new in this batch. */
  private async tableForWrite(batch: Batch, l1i: number): Promise<void> {
    if (batch.newTables.has(l1i)) return;
    const existing = this.l1Entry(l1i);
    if (existing) {
      if (existing < this.header.l1TableOffset + this.l1.length || existing + this.l2Bytes > this.space.end) {
        throw corrupt(`L1 entry ${l1i}: L2 table at 0x${existing.toString(16)} is outside the file's data area; refusing to write`, this.filename);
      }
      return;
    }
    // QEMU puts a new L2 table at the end of the file, cluster-aligned, before the cluster that needed it.
    const offset = this.space.takeAligned(this.l2Bytes);
    batch.newTables.set(l1i, { offset, table: new BigUint64Array(this.l2Entries) });
  }

  /** Reserve space at the end of the file for a cluster's bytes and record its new entry. */
  private async allocate(batch: Batch, index: number, bytes: Uint8Array, kind: 'normal' | 'compressed'): Promise<void> {
    const l1i = Math.floor(index / this.l2Entries);
    await this.tableForWrite(batch, l1i);
    let host: number;
    let value: bigint;
    if (kind === 'normal') {
      host = this.space.takeAligned(this.clusterSize);
      value = normalEntry(host);
      batch.writes.push({ host, bytes });
    } else {
      const gap = this.space.takeGap(bytes.length);
      if (gap !== undefined) {
        host = gap;
        batch.writes.push({ host, bytes });
      } else {
        host = await this.space.appendCompressed(bytes);
        // Counted now: the tail is written in large pieces, when it is full or at syncLinks.
        this.links.wrote(bytes.length);
      }
      value = compressedEntry(host, bytes.length, this.clusterBits);
    }
    let list = batch.entries.get(l1i);
    if (!list) batch.entries.set(l1i, (list = []));
    list.push({ index: index % this.l2Entries, value });
  }

  /**
   * Write the batch's data and new tables, then link them in. In memory the links take effect at
   * once (this process reads the bytes it has written); on disk they wait for syncLinks(), which
   * flushes first, so many writes share one flush and no link ever reaches the disk before the
   * bytes it points at.
   */
  private async commit(batch: Batch): Promise<void> {
    if (batch.entries.size === 0) return;
    for (const [l1i, { offset, table }] of batch.newTables) {
      for (const e of batch.entries.get(l1i) ?? []) table[e.index] = e.value;
      batch.writes.push({ host: offset, bytes: encodeTable(table) });
    }
    batch.writes.sort((a, b) => a.host - b.host);
    for (let i = 0; i < batch.writes.length; ) {
      // Neighbouring writes go out as one.
      let j = i + 1;
      let end = batch.writes[i]!.host + batch.writes[i]!.bytes.length;
      while (j < batch.writes.length && batch.writes[j]!.host === end) end += batch.writes[j++]!.bytes.length;
      await this.store.write(batch.writes[i]!.host, j === i + 1 ? batch.writes[i]!.bytes : concat(batch.writes.slice(i, j).map((w) => w.bytes)));
      this.links.wrote(end - batch.writes[i]!.host);
      i = j;
    }

    for (const [l1i, list] of batch.entries) {
      if (batch.newTables.has(l1i)) continue;
      const offset = this.l1Entry(l1i);
      const table = await this.l2Table(offset);
      for (const e of list) {
        table[e.index] = e.value;
        this.links.l2Changed(offset, e.index);
      }
      this.l2Cache.put(offset, table, true); // pinned: the disk copy is behind until syncLinks()
    }
    for (const [l1i, { offset, table }] of batch.newTables) {
      this.l2Cache.put(offset, table); // written whole above: the disk copy is current
      this.l1View.setBigUint64(8 * l1i, BigInt(offset));
      this.l2Offsets.splice(upperBound(this.l2Offsets, offset), 0, offset);
      this.links.l1Changed(l1i);
    }
    if (this.links.due(this.l2Cache.pinnedCount)) await this.syncLinks();
  }

  /** Flush the data written so far, then write the L2 and L1 entries that point at it. Under the mutex. */
  private async syncLinks(): Promise<void> {
    await this.space.writeTail();
    // The tables are pinned, so l2Table gives the in-memory copies.
    if (await this.links.sync(this.store, { offset: this.header.l1TableOffset, bytes: this.l1 }, (offset) => this.l2Table(offset))) this.l2Cache.unpinAll();
  }

  /**
   * Store one cluster compressed (`offset` cluster-aligned; `data` a whole cluster, or the image's
   * last partial cluster). A cluster that does not shrink is stored as normal data. A cluster that
   * already holds normal data is overwritten in place, uncompressed: its space is in use anyway,
   * and QEMU 7.2's in-place compressed overwrite leaves the guest reading deflate bytes.
   */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, data.length);
    const cs = this.clusterSize;
    if (offset % cs !== 0 || data.length === 0 || data.length > cs || (data.length < cs && offset + data.length !== this.size)) {
      throw invalidArgument(`compressed writes must cover exactly one cluster (${cs} bytes, cluster-aligned; the last one may be short): got [${offset}, +${data.length})`);
    }
    if (this.encrypted) throw unsupported('Compression and encryption not supported at the same time (QEMU would store the cluster unencrypted)', this.filename);
    const cluster = new Uint8Array(cs);
    cluster.set(data);
    // Deflate outside the lock: parallel writers compress at the same time. The clusters still
    // take their places in the order of the calls (as in qcow2's writeCompressed): the same input
    // gives the same file.
    const deflating = deflateRaw(cluster);
    deflating.catch(() => undefined); // taken in turn below
    const queued = await this.compressOrder.run(async () => {
      const packed = await deflating;
      return { done: this.placeCompressed(offset, data, packed) };
    });
    await queued.done;
  }

  /** The locked step of writeCompressed: the cluster stored compressed, or plain when it did not shrink. */
  private placeCompressed(offset: number, data: Uint8Array, packed: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    return this.mutex.run(async () => {
      const index = offset / cs;
      if (packed.length >= cs || (await this.entryOf(index)).kind === 'normal') {
        await this.writePiece(offset, data);
        return;
      }
      const batch = newBatch();
      await this.allocate(batch, index, packed, 'compressed');
      await this.commit(batch);
    });
  }

  /** Zeros need no writing where the image already reads as zeros (unallocated, no backing file). */
  protected override async doWriteZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    await this.mutex.run(async () => {
      const todo = this.backing ? [{ guest: offset, length }] : (await this.pieces(offset, length)).filter((p) => p.entry.kind !== 'unallocated');
      if (todo.length > 0 && options.fastOnly) throw unsupported('qcow: fast zeroing is not supported (there is no zero flag)', this.filename);
      for (const p of todo) {
        const zeros = new Uint8Array(Math.min(p.length, WRITE_PIECE));
        for (let done = 0; done < p.length; done += zeros.length) {
          const n = Math.min(zeros.length, p.length - done);
          await this.writeLocked(p.guest + done, zeros.subarray(0, n));
        }
      }
    });
  }

  // ---------------------------------------------------------------- the rest

  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return (await this.pieces(offset, length)).map((p): BlockExtent => {
      switch (p.entry.kind) {
        case 'unallocated':
          return { offset: p.guest, length: p.length, allocated: false, zero: !this.backing, data: false };
        case 'compressed':
          return { offset: p.guest, length: p.length, allocated: true, zero: false, data: true, compressed: true };
        case 'normal': {
          const e: BlockExtent = { offset: p.guest, length: p.length, allocated: true, zero: false, data: true };
          // As QEMU: enciphered bytes are not the guest's bytes, so no host offset is given.
          if (!this.encrypted) e.hostOffset = p.host!;
          return e;
        }
      }
    });
  }

  /**
   * Copy offload and the native copy loop, source side: normal clusters of an unencrypted image
   * are plain bytes of the file (runs contiguous in the file joined, as reads join them). The
   * in-memory entries of new clusters are set only after their bytes are written (see commit), so
   * a run handed out here is in the file. Without this, a qcow source took the TypeScript copy
   * loop of convert: a read per item through this device, a zero scan and a write per run.
   */
  async plainExtents(offset: number, length: number): Promise<PlainExtent[]> {
    this.checkRequest(offset, length);
    const out: PlainExtent[] = [];
    if (length === 0) return out;
    for (const p of await this.pieces(offset, length)) {
      const plain = p.entry.kind === 'normal' && !this.encrypted;
      const last = out[out.length - 1];
      if (plain && last?.store && last.hostOffset! + last.length === p.host) last.length += p.length;
      else if (!plain && last && !last.store) last.length += p.length;
      else out.push(plain ? { offset: p.guest, length: p.length, store: this.store, hostOffset: p.host! } : { offset: p.guest, length: p.length });
    }
    return out;
  }

  /**
   * Drop every cluster so the whole image reads from its backing file again (qemu-img commit
   * empties a qcow overlay this way). The zeroed L1 table reaches the disk first, then the file is
   * cut back to the end of the L1 table: a crash in between leaves only unreferenced space.
   */
  async makeEmpty(): Promise<void> {
    this.checkWritable();
    await this.mutex.run(async () => {
      await this.syncLinks();
      this.l1.fill(0);
      await this.store.write(this.header.l1TableOffset, this.l1);
      await this.store.flush();
      const end = this.header.l1TableOffset + this.l1.length; // where qemu cuts it too
      await this.store.truncate(end);
      this.space.reset(end);
      this.l2Cache.clear();
      this.l2Offsets.length = 0;
      this.lastInflated = null;
    });
  }

  async describe(): Promise<ImageDescription> {
    const d: ImageDescription = { format: 'qcow', virtualSize: this.size, clusterSize: this.clusterSize };
    if (this.encrypted) d.encrypted = true;
    if (this.backingName !== undefined) d.backingFilename = this.backingName;
    return d;
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.mutex.run(async () => {
      await this.syncLinks();
      await this.store.flush();
    });
  }

  protected async doClose(): Promise<void> {
    // Waits for writes still running, then puts every link on disk.
    await this.flush();
    this.l2Cache.clear();
    this.lastInflated = null;
    await this.store.close();
  }
}

const UNALLOCATED: ClusterEntry = { kind: 'unallocated' };

/** The number of sorted values <= v. */
function upperBound(sorted: number[], v: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid]! <= v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function newBatch(): Batch {
  return { writes: [], entries: new Map(), newTables: new Map() };
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}
