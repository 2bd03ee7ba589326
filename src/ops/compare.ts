/**
 * `qemu-img compare`: are two images the same to a guest? Ranges both chains report as zeros are
 * not read; the rest is read in large chunks. Like qemu-img, a mismatch is reported at the
 * 512-byte sector that holds the first differing byte, and a size difference is allowed when the
 * larger image is zero beyond the smaller one (unless strict).
 */
import { alignedBuffers } from '../core/aligned.js';
import { firstNonZero as firstNonZeroByte } from '../core/bytes.js';
import type { BlockDevice } from '../core/block-device.js';
import { throwIfAborted } from '../core/errors.js';
import { ChainStatus, type ChainExtent } from './chain-status.js';
import { firstDifference } from './zero-scan.js';
import { ITEM, NativeCompare } from './native-compare.js';

/** Options of {@link compareImages}. */
export interface CompareOptions {
  /** Fail on a size difference or an allocation difference (qemu-img -s). */
  strict?: boolean;
  /** Stops the operation between steps; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
  /** Called as the comparison moves on: guest bytes compared so far, out of the larger size. */
  onProgress?: (done: number, total: number) => void;
  /**
   * Called when reading image `a` or `b` fails, with the offset of the read that failed, before
   * the failure is thrown (qemu-img names the image and the offset).
   */
  onReadFailure?: (image: 'a' | 'b', offset: number) => void;
}

/** The verdict of {@link compareImages}. */
export type CompareResult =
  | {
      /** The images read the same to a guest. */
      identical: true;
      /** The sizes differ (the larger image reads as zeros past the smaller one). */
      sizeMismatch: boolean;
    }
  | {
      /** The images differ. */
      identical: false;
      /** The sizes differ. */
      sizeMismatch: boolean;
      /** The first differing 512-byte sector's offset in bytes (absent when only the sizes differ in strict mode). */
      offset?: number;
      /** What differs: the bytes, the size (strict), or the allocation status (strict). */
      reason: 'content' | 'size' | 'allocation';
    };

/** The largest read, per image. */
const CHUNK = 2 * 1024 * 1024;
/**
 * The first reads, per image. A page of a buffer costs ~16 us of CPU the first time it is written
 * (on our VM): two 2 MiB buffers filled at once are 1024 pages, ~16 ms, more than the rest of the
 * work of comparing two small images. Reads grow to CHUNK as the data compared grows (see
 * {@link compareImages}); the buffers are allocated whole, and pages never written cost nothing.
 */
const FIRST_CHUNK = 256 * 1024;
/** A read size doubles once this many times its size has been compared. */
const GROWTH = 8;
/**
 * The native loop's largest piece per side: both pieces (read by the kernel, then compared) stay
 * in a core's L2 cache share.
 */
const NATIVE_PIECE = 512 * 1024;
/**
 * Its first pieces, doubling once PIECE_GROWTH times a piece has been compared, and each item at
 * most PIECE_GROWTH pieces until they are NATIVE_PIECE. The kernel's copy into a fresh page of a
 * buffer costs a page fault (~16 us on our VM, see FIRST_CHUNK), a read ~1-2 us: a 3 MiB
 * comparison first-touches 2 x 64 KiB of buffer pages (32 faults) for 96 reads, where pieces
 * growing from 256 KiB as FIRST_CHUNK does touched 2 x 256 KiB (128 faults) for 24 reads. A
 * large comparison reads in NATIVE_PIECEs from 16 MiB on.
 */
const NATIVE_FIRST = 64 * 1024;
const PIECE_GROWTH = 32;

/**
 * Whether two images read the same to a guest, as `qemu-img compare`: ranges both report as zero
 * are not read, and a mismatch is reported at the sector of the first differing byte.
 *
 * @example
 * ```ts
 * import { openImage, compareImages } from 'qcow/node';
 *
 * await using a = await openImage('disk.img', { readOnly: true });
 * await using b = await openImage('disk.qcow2', { readOnly: true });
 * const r = await compareImages(a, b);
 * console.log(r.identical ? 'Images are identical.' : `Content mismatch at offset ${r.offset}`);
 * ```
 */
export async function compareImages(a: BlockDevice, b: BlockDevice, options: CompareOptions = {}): Promise<CompareResult> {
  const sizeMismatch = a.size !== b.size;
  if (sizeMismatch && options.strict) return { identical: false, sizeMismatch, reason: 'size' };
  const common = Math.min(a.size, b.size);
  const total = Math.max(a.size, b.size);
  const sa = new ChainStatus(a);
  const sb = new ChainStatus(b);
  // Page aligned: the kernel copies into them faster (core/aligned.ts).
  const [bufA, bufB] = alignedBuffers(2, CHUNK) as [Uint8Array, Uint8Array];
  // Reads start small and double up to CHUNK: the pages first written stay a fraction (1/GROWTH)
  // of the data compared, and a large comparison soon reads in CHUNKs.
  let chunk = FIRST_CHUNK;
  let compared = 0;
  const native = NativeCompare.for(a, b);
  let piece = NATIVE_FIRST;
  for (let off = 0; off < common; ) {
    throwIfAborted(options.signal);
    // Ask for whole runs (zero runs are then skipped in one step); reads are cut to CHUNK below.
    const ea = await sa.at(off, common - off);
    // Strict mode compares the two runs whole (the sizes are equal then), otherwise b's run only
    // matters as far as a's goes.
    const eb = await sb.at(off, options.strict ? common - off : ea.length);
    const zeroA = !ea.present || ea.zero;
    const zeroB = !eb.present || eb.zero;
    // Strict mode, as qemu-img: the block status itself must agree (allocated, zero, data,
    // whether a host offset is known, and even whether the run reaches the end of the image), not
    // only the bytes.
    if (options.strict && (!sameStatus(ea, eb) || (ea.start + ea.length === common) !== (eb.start + eb.length === common))) {
      return { identical: false, sizeMismatch, offset: off, reason: 'allocation' };
    }
    let len = zeroA && zeroB ? Math.min(ea.length, eb.length) : Math.min(ea.length, eb.length, native ? (piece < NATIVE_PIECE ? PIECE_GROWTH * piece : ITEM) : chunk);
    if (!(zeroA && zeroB) && native) {
      // Both sides' bytes read and compared by the addon, when it can place them (see
      // native-compare.ts); otherwise the TypeScript way below, which finds the same difference.
      const diff = await native.compare(off, len, ea, eb, bufA, bufB, piece);
      if (diff !== undefined) {
        if (diff >= 0) return { identical: false, sizeMismatch, offset: sectorOf(off + diff), reason: 'content' };
        compared += len;
        while (chunk < CHUNK && compared >= GROWTH * chunk) chunk *= 2;
        while (piece < NATIVE_PIECE && compared >= PIECE_GROWTH * piece) piece *= 2;
        off += len;
        options.onProgress?.(off, total);
        continue;
      }
      len = Math.min(len, chunk);
    }
    if (!(zeroA && zeroB)) {
      const da = bufA.subarray(0, len);
      const db = bufB.subarray(0, len);
      await Promise.all([zeroA ? da.fill(0) : readOrTell(a, off, da, 'a', options), zeroB ? db.fill(0) : readOrTell(b, off, db, 'b', options)]);
      const diff = firstDifference(da, db);
      if (diff >= 0) return { identical: false, sizeMismatch, offset: sectorOf(off + diff), reason: 'content' };
      compared += len;
      if (chunk < CHUNK && compared >= GROWTH * chunk) chunk *= 2;
    }
    off += len;
    options.onProgress?.(off, total);
  }
  if (sizeMismatch) {
    const bigger = a.size > b.size ? a : b;
    const nz = await firstNonZero(bigger, common, bigger.size, options.signal, (at) => options.onReadFailure?.(bigger === a ? 'a' : 'b', at));
    if (nz >= 0) return { identical: false, sizeMismatch, offset: sectorOf(nz), reason: 'content' };
  }
  options.onProgress?.(total, total);
  return { identical: true, sizeMismatch };
}

/** Offset of the first non-zero guest byte in [start, end), or -1. */
export async function firstNonZero(dev: BlockDevice, start: number, end: number, signal?: AbortSignal, onReadFailure?: (offset: number) => void): Promise<number> {
  const st = new ChainStatus(dev);
  const buf = new Uint8Array(CHUNK);
  for (let off = start; off < end; ) {
    throwIfAborted(signal);
    const e = await st.at(off, Math.min(CHUNK, end - off));
    if (e.present && !e.zero) {
      const d = buf.subarray(0, e.length);
      await dev.read(off, d).catch((err: unknown) => {
        onReadFailure?.(off);
        throw err;
      });
      const i = firstNonZeroByte(d);
      if (i < d.length) return off + i;
    }
    off += e.length;
  }
  return -1;
}

function readOrTell(dev: BlockDevice, offset: number, into: Uint8Array, which: 'a' | 'b', options: CompareOptions): Promise<void> {
  if (!options.onReadFailure) return dev.read(offset, into);
  return dev.read(offset, into).catch((err: unknown) => {
    options.onReadFailure!(which, offset);
    throw err;
  });
}

const sectorOf = (byte: number) => byte - (byte % 512);

const sameStatus = (a: ChainExtent, b: ChainExtent): boolean =>
  a.present === b.present && a.zero === b.zero && a.data === b.data && (a.offset === undefined) === (b.offset === undefined);

