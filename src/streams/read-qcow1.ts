/**
 * Read a qcow (v1) image front to back from a stream into a target, in one pass: the qcow v1
 * counterpart of read-qcow2.ts. qcow v1 has no refcounts and its L2 tables need not be one cluster
 * long, so this reader works in byte ranges: each wanted structure (the L1 table, an L2 table, a
 * data or compressed cluster) is assembled from the pieces of the stream that cover it, and bytes
 * nobody has named yet are held (bounded by `bufferBytes` of memory, then an optional spill) only
 * while some L2 table is still to come. QEMU writes the L1 table after the header and every L2 table before the clusters it maps,
 * so its images stream with nothing held.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, corrupt, throwIfAborted } from '../core/errors.js';
import { decodeHeader, l1SizeOf, virtualSizeOf, CRYPT_AES, type QcowHeader } from '../formats/qcow1/header.js';
import { decodeEntry } from '../formats/qcow1/l2-entry.js';
import { inflateRaw } from '../compress/lazy.js';
import { legacyAesCipher } from '../crypto/legacy-aes.js';
import type { SectorCipher } from '../crypto/types.js';
import type { StreamImageInfo, StreamReadOptions, StreamReadResult } from './read-qcow2.js';
import type { ClusterReader } from './cluster-reader.js';
import { GatheredWrites } from './gathered-writes.js';
import type { Spill } from './spill.js';

/** The piece of the stream looked at at once. */
const UNIT = 64 * 1024;

type Want = { offset: number; length: number; buf?: Uint8Array; filled: number } & (
  | { kind: 'l1' }
  | { kind: 'l2'; guest: number }
  | { kind: 'data'; guest: number }
  | { kind: 'compressed'; guest: number }
);

export async function readQcow1Stream(
  reader: ClusterReader,
  openTarget: (info: StreamImageInfo) => Promise<BlockDevice>,
  options: StreamReadOptions = {},
): Promise<StreamReadResult & { target: BlockDevice }> {
  const head = await reader.take(UNIT);
  if (head.length < 48) throw new QcowError('QCOW_CORRUPT', `the stream ended after ${head.length} bytes, inside the qcow header`);
  const h = decodeHeader(head, Number.MAX_SAFE_INTEGER);
  let backingFile: string | undefined;
  if (h.backingFileOffset !== 0) {
    if (h.backingFileOffset + h.backingFileSize > head.length) throw new QcowError('QCOW_UNSUPPORTED', 'the backing file name lies beyond the first 64 KiB of the stream');
    backingFile = new TextDecoder().decode(head.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
  }
  let cipher: SectorCipher | undefined;
  if (h.cryptMethod === CRYPT_AES) {
    if (options.password === undefined) throw new QcowError('QCOW_NEED_PASSWORD', 'image is encrypted: a password is required (--password-file)');
    cipher = await legacyAesCipher(options.password);
  }
  const cs = 2 ** h.clusterBits;
  const size = virtualSizeOf(h);
  const info: StreamImageInfo = { format: 'qcow', size, clusterSize: cs, extendedL2: false, backingFile };
  const target = await openTarget(info);
  const state = new Qcow1Stream(h, size, new GatheredWrites(target, reader), options.bufferBytes ?? 64 * 1024 * 1024, cipher, options.signal, options.spill);
  try {
    await state.run(reader, head, options.onProgress);
  } finally {
    await state.settle();
  }
  return { bytesIn: reader.offset, peakBuffered: state.peakBuffered, decided: (c) => state.isDecided(c), info, target };
}

class Qcow1Stream {
  private readonly cs: number;
  private readonly byUnit = new Map<number, Want[]>();
  private active: Want[] = [];
  private readonly kept = new Map<number, Uint8Array>();
  private keptBytes = 0;
  /** Units moved to the spill once memory was full: unit -> [offset in the spill, length]. */
  private readonly spilled = new Map<number, [number, number]>();
  private spilledBytes = 0;
  peakBuffered = 0;
  private tablesPending = 0;
  private dataPending = 0;
  private readonly decided: Uint8Array;
  private unit = 0;
  /** The bytes of unit `unit`, while it is looked at. */
  private current: Uint8Array = new Uint8Array(0);

  constructor(
    private readonly h: QcowHeader,
    private readonly size: number,
    private readonly out: GatheredWrites,
    private readonly budget: number,
    private readonly cipher: SectorCipher | undefined,
    private readonly signal?: AbortSignal,
    private readonly spill?: { store: Spill; limit: number },
  ) {
    this.cs = 2 ** h.clusterBits;
    this.decided = new Uint8Array(Math.ceil(Math.ceil(size / this.cs) / 8));
  }

  isDecided(c: number): boolean {
    return ((this.decided[c >> 3]! >> (c & 7)) & 1) === 1;
  }

  async run(reader: ClusterReader, head: Uint8Array, onProgress?: (n: number) => void): Promise<void> {
    const l1Bytes = l1SizeOf(this.h) * 8;
    let bytes = head;
    await this.want({ kind: 'l1', offset: this.h.l1TableOffset, length: l1Bytes, filled: 0 });
    for (;;) {
      throwIfAborted(this.signal);
      if (this.out.failure !== undefined) throw this.out.failure;
      await this.arrived(bytes);
      onProgress?.(reader.offset);
      if (this.tablesPending === 0 && this.dataPending === 0) {
        // Everything mapped is in; read on a while so a writer sending the whole file is not cut off.
        const stopAt = reader.offset + Math.max(this.budget, 64 * 1024 * 1024);
        while (reader.offset < stopAt && (await reader.take(1 << 20)).length > 0) onProgress?.(reader.offset);
        return;
      }
      if (bytes.length < UNIT) return this.ended(reader.offset);
      this.unit++;
      bytes = await reader.take(UNIT);
      if (bytes.length === 0) return this.ended(reader.offset);
      await this.out.backPressure();
    }
  }

  private async want(w: Want): Promise<void> {
    if (w.kind === 'data' || w.kind === 'compressed') this.dataPending++;
    else this.tablesPending++;
    const first = Math.floor(w.offset / UNIT);
    if (first > this.unit) {
      const list = this.byUnit.get(first);
      if (list) list.push(w);
      else this.byUnit.set(first, [w]);
      return;
    }
    if (first === this.unit && this.direct(w, this.current)) return;
    // Starts in bytes already seen: they must still be held (this unit is handled by arrived()).
    w.buf = new Uint8Array(w.length);
    for (let u = first; u < this.unit; u++) {
      const kept = this.kept.get(u) ?? (await this.unspill(u));
      if (!kept) throw corrupt(`a table points back to 0x${w.offset.toString(16)}, which the stream has already passed (the image is not laid out front to back)`);
      this.fill(w, u, kept);
    }
    this.active.push(w);
  }

  /** A data cluster all inside the current unit: written from the reader's memory, not copied. */
  private direct(w: Want, bytes: Uint8Array): boolean {
    const from = w.offset - this.unit * UNIT;
    if (w.kind !== 'data' || this.cipher || from < 0 || from + w.length > bytes.length) return false;
    this.dataPending--;
    this.out.write(w.guest, bytes.subarray(from, from + w.length));
    return true;
  }

  /** Copy the part of `w` that unit `u` holds. */
  private fill(w: Want, u: number, bytes: Uint8Array): void {
    const from = Math.max(w.offset, u * UNIT);
    const to = Math.min(w.offset + w.length, u * UNIT + bytes.length);
    if (to <= from) return;
    w.buf!.set(bytes.subarray(from - u * UNIT, to - u * UNIT), from - w.offset);
    w.filled += to - from;
  }

  private async arrived(bytes: Uint8Array): Promise<void> {
    const u = this.unit;
    const starting = this.byUnit.get(u) ?? [];
    this.byUnit.delete(u);
    this.current = bytes;
    for (const w of starting) {
      if (this.direct(w, bytes)) continue;
      w.buf = new Uint8Array(w.length);
      this.active.push(w);
    }
    // Held only when nothing named any of it: a unit a table has used is not named again by
    // QEMU's layouts, and holding every unit until the last L2 table would hold the image.
    if (this.active.length === 0 && starting.length === 0) {
      await this.keep(u, bytes);
      return;
    }
    // Completing a want may add wants that start in this unit: loop until none is left to fill.
    for (let pass = 0; pass < 64; pass++) {
      const now = this.active;
      this.active = [];
      let progressed = false;
      for (const w of now) {
        if (w.filled < w.length) this.fill(w, u, bytes);
        if (w.filled >= w.length) {
          progressed = true;
          await this.complete(w);
        } else this.active.push(w);
      }
      if (!progressed) break;
    }
  }

  private async keep(u: number, bytes: Uint8Array): Promise<void> {
    if (this.tablesPending === 0) return;
    if (this.keptBytes + bytes.length <= this.budget) {
      this.kept.set(u, bytes.slice());
      this.keptBytes += bytes.length;
    } else {
      // Memory is full: the spill folder, up to its own limit.
      const spill = this.spill;
      if (!spill || spill.store.size + bytes.length > spill.limit) {
        throw new QcowError(
          'QCOW_UNSUPPORTED',
          spill
            ? `this image's layout needs more than ${this.budget} bytes of memory and ${spill.limit} bytes of spill held until the tables that name them arrive: allow more (--stream-buffer SIZE, --stream-spill-size SIZE) or give qcow the file itself`
            : `this image's layout needs more than ${this.budget} bytes held until the tables that name them arrive: allow more (--stream-buffer SIZE, or --stream-spill DIR) or give qcow the file itself`,
        );
      }
      this.spilled.set(u, [spill.store.size, bytes.length]);
      await spill.store.append(bytes);
      this.spilledBytes += bytes.length;
    }
    this.peakBuffered = Math.max(this.peakBuffered, this.keptBytes + this.spilledBytes);
  }

  /** A unit moved to the spill, read back; undefined when it was never held. */
  private async unspill(u: number): Promise<Uint8Array | undefined> {
    const at = this.spilled.get(u);
    if (!at || !this.spill) return undefined;
    const bytes = new Uint8Array(at[1]);
    await this.spill.store.read(at[0], bytes);
    return bytes;
  }

  private async complete(w: Want): Promise<void> {
    const buf = w.buf!;
    w.buf = undefined;
    const cs = this.cs;
    switch (w.kind) {
      case 'l1': {
        this.tablesPending--;
        const coverage = cs * 2 ** this.h.l2Bits;
        for (let i = 0; i * 8 < buf.length; i++) {
          const off = readU64(buf, i * 8);
          if (off !== 0) await this.want({ kind: 'l2', offset: off, length: 2 ** this.h.l2Bits * 8, filled: 0, guest: i * coverage });
        }
        break;
      }
      case 'l2': {
        this.tablesPending--;
        for (let i = 0; i * 8 < buf.length; i++) {
          const guest = w.guest + i * cs;
          if (guest >= this.size) break;
          const hi = new DataView(buf.buffer, buf.byteOffset).getBigUint64(i * 8);
          const e = decodeEntry(hi, this.h.clusterBits);
          if (e.kind === 'unallocated') continue;
          const c = guest / cs;
          this.decided[c >> 3]! |= 1 << (c & 7);
          if (e.kind === 'normal') await this.want({ kind: 'data', offset: e.hostOffset, length: Math.min(cs, this.size - guest), filled: 0, guest });
          else await this.want({ kind: 'compressed', offset: e.hostOffset, length: e.compressedSize, filled: 0, guest });
        }
        break;
      }
      case 'data': {
        this.dataPending--;
        const data = this.cipher ? await this.cipher.decrypt(padSectors(buf), w.guest / 512) : buf;
        this.write(w.guest, data.subarray(0, buf.length));
        break;
      }
      case 'compressed': {
        this.dataPending--;
        const data = await inflateRaw(buf, cs);
        this.write(w.guest, data.subarray(0, Math.min(cs, this.size - w.guest)));
        break;
      }
    }
    if (this.tablesPending === 0) {
      this.kept.clear();
      this.keptBytes = 0;
      this.spilled.clear();
      this.spilledBytes = 0;
    }
  }

  private ended(at: number): void {
    const left = [...this.active, ...[...this.byUnit.values()].flat()];
    const first = left.sort((a, b) => a.offset - b.offset)[0];
    if (!first) return;
    const what = first.kind === 'l1' ? 'the L1 table' : first.kind === 'l2' ? 'an L2 table' : 'data the image maps';
    throw new QcowError('QCOW_CORRUPT', `the stream ended at ${at} bytes, before ${what} at 0x${first.offset.toString(16)}`);
  }

  private write(guest: number, data: Uint8Array): void {
    this.out.write(guest, data);
  }

  async settle(): Promise<void> {
    await this.out.settle();
  }
}

function readU64(b: Uint8Array, at: number): number {
  const v = new DataView(b.buffer, b.byteOffset).getBigUint64(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`table entry 0x${v.toString(16)} is too large`);
  return Number(v);
}

/** Encryption works on whole sectors: the last cluster of a ragged image is padded for it. */
function padSectors(b: Uint8Array): Uint8Array {
  if (b.length % 512 === 0) return b;
  const out = new Uint8Array(Math.ceil(b.length / 512) * 512);
  out.set(b);
  return out;
}
