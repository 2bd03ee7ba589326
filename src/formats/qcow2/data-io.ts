/**
 * Guest data in and out of host clusters: reading a run of the cluster map (data, zeros, the
 * backing image, a compressed cluster), decrypting and encrypting sector-wise for encrypted images,
 * decompressing clusters (neighbouring compressed clusters read with one store read, the last one
 * kept for small sequential reads) and compressing them for compressed writes.
 * No metadata changes here: where a run lives is the cluster map's (cluster-map.ts), allocating
 * and linking is the writer's (write.ts).
 */
import { BufferReuse } from '../../core/buffer-reuse.js';
import { corrupt } from '../../core/errors.js';
import { deflateRaw, zstdCompress } from '../../compress/lazy.js';
import { COMPRESSION_ZSTD } from './header.js';
import { decompressCluster } from './compressed.js';
import type { ClusterDescriptor } from './l2-entry.js';
import type { ClusterMap, GuestRun } from './cluster-map.js';
import type { Qcow2Image } from './image.js';

/** Compressed clusters further apart than this in the file are read separately. */
const COMPRESSED_GAP_MAX = 4096;
/** Largest host span read at once for a group of compressed clusters. */
const COMPRESSED_GROUP_MAX = 4 * 1024 * 1024;
/**
 * Memory kept for reading compressed streams, per image: a convert reads up to 8 chunks of 2 MiB
 * at once, each of whose compressed clusters is one read of at most its packed size.
 */
const COMPRESSED_READ_KEEP = 16 * 1024 * 1024;

export class DataIo {
  /** The last decompressed cluster, by descriptor host offset: small sequential reads hit it. */
  private lastCompressed: { hostOffset: number; data: Uint8Array } | null = null;
  /** Buffers the compressed streams are read into, reused: each fresh one cost page faults. */
  private readonly packed = new BufferReuse(COMPRESSED_READ_KEEP);
  /**
   * What a read of [offset, +length) must wait for: the allocating write in flight of one of its
   * clusters (Qcow2Writer.dependency, set when the image is opened for writing). The writer sets
   * a new cluster's entry before its data lands; a read mapping the entry then would read the new
   * host cluster early, a hole (zeros) or, for a reused cluster, the bytes it held for another
   * guest offset. QEMU's read sees the old mapping until the data has landed; here it waits, then
   * reads the new data.
   */
  allocationInFlight: ((offset: number, length: number) => Promise<void> | undefined) | undefined;

  constructor(
    private readonly image: Qcow2Image,
    private readonly map: ClusterMap,
    /** Guest bytes from the backing image (zeros past its end, or without one). */
    private readonly readBacking: (offset: number, into: Uint8Array) => Promise<void>,
  ) {}

  /** Compressed clusters may have been replaced: forget the last one decompressed. */
  forgetCompressed(): void {
    this.lastCompressed = null;
  }

  private get compression(): 'zstd' | 'zlib' {
    return this.image.header.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib';
  }

  /** Guest bytes [offset, +into.length) of this layer. */
  read(offset: number, into: Uint8Array): Promise<void> {
    // The common request (one cached table, contiguous data clusters) in a function of its own,
    // kept small: V8 weighs an async function's calls and resumptions by its size, and with the
    // general path below in it, it was re-compiled by TurboFan (10-14 ms on the main thread,
    // inlining every step of the general path) within the first few hundred reads of a chain.
    // Not async: the store's promise is handed on (its count of bytes is not looked at).
    // Checked in the same synchronous step as the mapping below (see allocationInFlight).
    const dep = this.allocationInFlight?.(offset, into.length);
    if (dep) return dep.then(() => this.read(offset, into));
    const host = this.map.mappedHostRun(offset, into.length);
    if (host < 0) return this.readRuns(offset, into);
    // QEMU's driver event for a data read (its file node hears it): a property check unless set.
    const held = this.image.store.debugEvent?.('read_aio');
    if (held) return held.then(() => this.image.dataStore.read(host, into)).then(() => undefined);
    return this.image.dataStore.read(host, into) as Promise<unknown> as Promise<void>;
  }

  /** The general path of read(): the range's runs, each filled by its kind. */
  private async readRuns(offset: number, into: Uint8Array): Promise<void> {
    const runs = await this.map.mapRuns(offset, into.length);
    // The mapping may have suspended (a table load) while a write linked clusters of the range:
    // checked again now that it is decided, in the same step as the reads start.
    if (this.allocationInFlight?.(offset, into.length)) return this.read(offset, into);
    // One run (a layer that leaves the range to its backing file): no list of jobs to wait for.
    if (runs.length === 1) return this.readRun(runs[0]!, into);
    const view = (r: GuestRun) => into.subarray(r.offset - offset, r.offset - offset + r.length);
    // Runs are independent; issue them together so the store can overlap them.
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < runs.length; ) {
      const group = this.compressedGroup(runs, i);
      if (group > 1) {
        jobs.push(this.readCompressedGroup(runs.slice(i, i + group), view));
        i += group;
      } else {
        jobs.push(this.readRun(runs[i]!, view(runs[i]!)));
        i++;
      }
    }
    await Promise.all(jobs);
  }

  /** Host bytes to read for a compressed cluster: its bound, clipped to the file. */
  private compressedSpan(d: ClusterDescriptor): number {
    return Math.min(d.compressedBound, this.image.fileSize - d.hostOffset);
  }

  /**
   * How many runs from `i` on are compressed clusters lying one after another in the file (as
   * a compressing writer leaves them): those are read with one store read instead of one each,
   * a few hundred bytes apiece for well-compressed data.
   */
  private compressedGroup(runs: GuestRun[], i: number): number {
    const first = runs[i]!;
    if (first.kind !== 'compressed') return 1;
    const start = first.descriptor!.hostOffset;
    let end = start + this.compressedSpan(first.descriptor!);
    let n = 1;
    for (let j = i + 1; j < runs.length; j++, n++) {
      const d = runs[j]!.descriptor;
      if (runs[j]!.kind !== 'compressed' || !d) break;
      // Next in the file (streams share sectors, so it may start inside the previous bound).
      if (d.hostOffset < start || d.hostOffset > end + COMPRESSED_GAP_MAX) break;
      const e = d.hostOffset + this.compressedSpan(d);
      if (e - start > COMPRESSED_GROUP_MAX) break;
      end = Math.max(end, e);
    }
    return n;
  }

  /** Compressed runs from compressedGroup(): one read of their host span, then each decompressed. */
  private async readCompressedGroup(runs: GuestRun[], view: (r: GuestRun) => Uint8Array): Promise<void> {
    let start = Infinity;
    let end = 0;
    for (const r of runs) {
      const d = r.descriptor!;
      const n = this.compressedSpan(d);
      if (n <= 0) throw corrupt(`compressed cluster at 0x${d.hostOffset.toString(16)} lies beyond the end of the file`);
      start = Math.min(start, d.hostOffset);
      end = Math.max(end, d.hostOffset + n);
    }
    const raw = this.packed.take(end - start);
    try {
      await this.readCompressedRuns(runs, view, raw, start);
    } finally {
      this.packed.give(raw);
    }
  }

  private async readCompressedRuns(runs: GuestRun[], view: (r: GuestRun) => Uint8Array, raw: Uint8Array, start: number): Promise<void> {
    await this.image.store.read(start, raw);
    const kind = this.compression;
    // Every job settles before `raw` goes back for reuse, a failed neighbour or not.
    const settled = await Promise.allSettled(
      runs.map(async (r) => {
        const d = r.descriptor!;
        const into = view(r);
        const hit = this.lastCompressed;
        const from = d.hostOffset - start;
        const stream = () => raw.subarray(from, from + this.compressedSpan(d));
        if (hit && hit.hostOffset === d.hostOffset) into.set(hit.data.subarray(r.offset - r.clusterStart!, r.offset - r.clusterStart! + into.length));
        // A whole cluster (a copy, a large read) decompresses straight into the reader's buffer:
        // no cluster-sized buffer per cluster, whose fresh pages cost more than the inflate.
        else if (into.length === this.image.clusterSize) await decompressCluster(stream(), this.image.clusterSize, kind, d.hostOffset, into);
        else {
          const data = await decompressCluster(stream(), this.image.clusterSize, kind, d.hostOffset);
          this.lastCompressed = { hostOffset: d.hostOffset, data };
          const at = r.offset - r.clusterStart!;
          into.set(data.subarray(at, at + into.length));
        }
      }),
    );
    for (const s of settled) if (s.status === 'rejected') throw s.reason;
  }

  /** Fill `into` (exactly run.length bytes) with the run's guest content. */
  async readRun(r: GuestRun, into: Uint8Array): Promise<void> {
    switch (r.kind) {
      case 'zero-plain':
      case 'zero-alloc':
        into.fill(0);
        return;
      case 'unallocated':
      case 'unallocated-alloc':
        await this.readBacking(r.offset, into);
        return;
      case 'compressed': {
        if (into.length === this.image.clusterSize) {
          await this.compressedCluster(r.descriptor!, into);
          return;
        }
        const data = await this.compressedCluster(r.descriptor!);
        const from = r.offset - r.clusterStart!;
        into.set(data.subarray(from, from + into.length));
        return;
      }
      case 'normal':
        await this.readData(r.offset, r.hostOffset!, into);
    }
  }

  /** Guest bytes stored at `hostOffset` in the data store, decrypted when the image is encrypted. */
  async readData(guestOffset: number, hostOffset: number, into: Uint8Array): Promise<void> {
    const enc = this.image.encryption;
    const held = this.image.store.debugEvent?.('read_aio');
    if (held) await held;
    if (!enc) {
      await this.image.dataStore.read(hostOffset, into);
      return;
    }
    // Encryption works on whole 512-byte sectors; clusters and subclusters are sector aligned,
    // so widening the range to sectors stays inside the same (sub)cluster.
    const lead = guestOffset % 512;
    const cipher = enc.cipher();
    if (lead === 0 && into.length % 512 === 0 && cipher.decryptInPlace) {
      // Sector-aligned (whole clusters, as convert reads them): no second buffer and no copy.
      await this.image.dataStore.read(hostOffset, into);
      await cipher.decryptInPlace(into, (enc.ivFromHostSector ? hostOffset : guestOffset) / 512);
      return;
    }
    const total = Math.ceil((lead + into.length) / 512) * 512;
    const buf = new Uint8Array(total);
    await this.image.dataStore.read(hostOffset - lead, buf);
    const plain = await cipher.decrypt(buf, (enc.ivFromHostSector ? hostOffset - lead : guestOffset - lead) / 512);
    into.set(plain.subarray(lead, lead + into.length));
  }

  /**
   * One compressed cluster, decompressed (never encrypted, even in encrypted images): into `into`
   * (a whole cluster of the reader's buffer) when given, else into a buffer kept for the next
   * partial read of the same cluster.
   */
  async compressedCluster(d: ClusterDescriptor, into?: Uint8Array): Promise<Uint8Array> {
    const hit = this.lastCompressed;
    if (hit && hit.hostOffset === d.hostOffset) return into ? (into.set(hit.data), into) : hit.data;
    // The stored length is an upper bound that may run past EOF: read what exists.
    const n = Math.min(d.compressedBound, this.image.fileSize - d.hostOffset);
    if (n <= 0) throw corrupt(`compressed cluster at 0x${d.hostOffset.toString(16)} lies beyond the end of the file`);
    const raw = this.packed.take(n);
    try {
      await this.image.store.read(d.hostOffset, raw);
      if (into) return await decompressCluster(raw, this.image.clusterSize, this.compression, d.hostOffset, into);
      const data = await decompressCluster(raw, this.image.clusterSize, this.compression, d.hostOffset);
      this.lastCompressed = { hostOffset: d.hostOffset, data };
      return data;
    } finally {
      this.packed.give(raw);
    }
  }

  /** Plain guest bytes to a host offset, encrypted when the image is. */
  async writeData(guest: number, host: number, plain: Uint8Array): Promise<void> {
    const enc = this.image.encryption;
    const held = this.image.store.debugEvent?.('write_aio');
    if (held) await held;
    if (!enc) {
      await this.image.dataStore.write(host, plain);
      return;
    }
    const sector = (enc.ivFromHostSector ? host : guest) / 512;
    await this.image.dataStore.write(host, await enc.cipher().encrypt(plain, sector));
  }

  /**
   * Each cluster of `data` compressed with the image's compression type (a short last cluster
   * padded with zeros), all at once: the codec pool works on several in parallel.
   */
  compressClusters(data: Uint8Array): Promise<Uint8Array[]> {
    const cs = this.image.clusterSize;
    const zstd = this.compression === 'zstd';
    const packed: Promise<Uint8Array>[] = [];
    for (let done = 0; done < data.length; done += cs) {
      const chunk = data.subarray(done, Math.min(data.length, done + cs));
      let full = chunk;
      if (chunk.length !== cs) {
        full = new Uint8Array(cs);
        full.set(chunk);
      }
      packed.push(zstd ? zstdCompress(full) : deflateRaw(full));
    }
    return Promise.all(packed);
  }
}
