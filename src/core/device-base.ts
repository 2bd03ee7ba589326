/**
 * Shared behaviour of every format driver: argument checks, read-only enforcement, reads that
 * fall through to a (possibly shorter) backing device, and disposal. Formats extend it and fill in
 * the `do*` methods; the public methods stay uniform.
 */
import type { BlockDevice, BlockExtent, ImageDescription, WriteOptions, ZeroOptions } from './block-device.js';
import type { ByteStore } from '../storage/types.js';
import { QcowError, withFile } from './errors.js';

const ZERO_CHUNK = 1 << 20;

/**
 * Base class for format drivers: implements {@link BlockDevice}'s public methods (range and
 * read-only checks, errors naming the image, `fua`, closing the backing chain) on top of the
 * protected `do*` methods a format fills in. Extend it to add a format of your own.
 */
export abstract class DeviceBase implements BlockDevice {
  /** The format's name ("qcow2", "qcow", "raw"). */
  abstract readonly format: string;
  /** Allocation granularity in bytes: the cluster size, or 512 for raw. */
  abstract readonly clusterSize: number;
  /** The image's name (path or URL) as opened: the store's name. */
  readonly filename: string;
  /** The store holding the image itself. */
  readonly store: ByteStore;
  /** Virtual (guest-visible) size in bytes. */
  size: number;
  /** Opened read-only: writes, discards and resizes fail with QCOW_READ_ONLY. */
  readOnly: boolean;
  /** The opened backing image (the next layer of the chain), or null; closed with this device. */
  backing: BlockDevice | null = null;
  private closed = false;

  protected constructor(store: ByteStore, size: number, readOnly: boolean) {
    this.store = store;
    this.filename = store.name;
    this.size = size;
    this.readOnly = readOnly;
  }

  /** Read guest bytes into `into`; the request is already checked and non-empty. */
  protected abstract doRead(offset: number, into: Uint8Array): Promise<void>;
  /** Write guest bytes; the request is already checked, non-empty, and the device writable. */
  protected abstract doWrite(offset: number, data: Uint8Array, options: WriteOptions): Promise<void>;
  /** This layer's allocation of a checked, non-empty range; the result is merged by {@link mergeExtents}. */
  protected abstract doBlockStatus(offset: number, length: number): Promise<BlockExtent[]>;
  /** What the format knows about the image (the material of `qemu-img info`). */
  abstract describe(): Promise<ImageDescription>;
  /** Write cached metadata out and make everything written so far durable. */
  abstract flush(): Promise<void>;
  /** Release what the format holds (caches, its store). The backing device is closed by close(). */
  protected abstract doClose(): Promise<void>;

  /** Default: write zero-filled buffers. Formats with zero flags or holes override it. */
  protected async doWriteZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    if (options.fastOnly) throw new QcowError('QCOW_UNSUPPORTED', `${this.format}: fast zeroing is not supported`);
    const zeros = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length; ) {
      const n = Math.min(zeros.length, length - done);
      await this.doWrite(offset + done, n === zeros.length ? zeros : zeros.subarray(0, n), options);
      done += n;
    }
  }

  /** Default: discard is only a hint, so doing nothing is correct. */
  protected async doDiscard(_offset: number, _length: number): Promise<void> {}

  /** Fill `into` with guest bytes starting at `offset`. */
  read(offset: number, into: Uint8Array): Promise<void> {
    // Not async, like write(): the request's promise is the format's, with the error naming on it.
    try {
      this.checkRequest(offset, into.length);
    } catch (e) {
      return Promise.reject(e);
    }
    if (into.length === 0) return Promise.resolve();
    let read: Promise<void>;
    try {
      read = this.doRead(offset, into);
    } catch (e) {
      read = Promise.reject(e);
    }
    return read.catch(this.nameTheImage);
  }

  /** Write `data` as guest bytes at `offset`; with `fua`, flush before resolving. */
  write(offset: number, data: Uint8Array, options: WriteOptions = {}): Promise<void> {
    // Not an async function: that was one more promise and suspension per request, on top of the
    // format's (qcow2 hands back the data write's own promise for most requests).
    try {
      this.checkWritable();
      this.checkRequest(offset, data.length);
    } catch (e) {
      return Promise.reject(e);
    }
    if (data.length === 0) return Promise.resolve();
    let written: Promise<void>;
    try {
      written = this.doWrite(offset, data, options);
    } catch (e) {
      written = Promise.reject(e);
    }
    written = written.catch(this.nameTheImage);
    return options.fua ? written.then(() => this.flush()) : written;
  }

  /** Make the range read as zeros (the format's zero flags or holes where it has them); with `fua`, flush before resolving. */
  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, length);
    if (length === 0) return;
    await this.doWriteZeroes(offset, length, options).catch(this.nameTheImage);
    if (options.fua) await this.flush();
  }

  /** Drop the range's data where the format can (a hint: formats without discard do nothing). */
  async discard(offset: number, length: number): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, length);
    if (length === 0) return;
    await this.doDiscard(offset, length).catch(this.nameTheImage);
  }

  /** Allocation of [offset, offset+length) in this layer only, merged into maximal runs. */
  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    this.checkRequest(offset, length);
    if (length === 0) return [];
    return mergeExtents(await this.doBlockStatus(offset, length).catch(this.nameTheImage));
  }

  /** Release what the format holds (writing it out first when writable), then close the backing chain. A second call does nothing. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.doClose();
    } finally {
      await this.backing?.close();
    }
  }

  /** The same as {@link close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** Read guest bytes from the backing device; past its end (or without one) they are zeros. */
  protected async readBacking(offset: number, into: Uint8Array): Promise<void> {
    const b = this.backing;
    const n = b ? Math.max(0, Math.min(into.length, b.size - offset)) : 0;
    if (n > 0) await b!.read(offset, n === into.length ? into : into.subarray(0, n));
    if (n < into.length) into.fill(0, n);
  }

  /** Errors found while reading or writing name the image (a backing file's own errors keep its name). */
  protected readonly nameTheImage = (e: unknown): never => {
    throw withFile(e, this.filename);
  };

  /** Throw QCOW_READ_ONLY when the device is read-only. */
  protected checkWritable(): void {
    if (this.readOnly) throw new QcowError('QCOW_READ_ONLY', 'image is opened read-only', { file: this.filename });
  }

  /** See {@link BlockDevice.unusable}: formats that give up on an image override it. */
  get unusable(): Error | undefined {
    return undefined;
  }

  /**
   * Throw the device's {@link unusable} error when it has one (first, as QEMU's block layer fails
   * every request to a node without a driver before it looks at the range), QCOW_INVALID_ARGUMENT
   * for a malformed range, QCOW_OUT_OF_RANGE for one past the end.
   */
  protected checkRequest(offset: number, length: number): void {
    const unusable = this.unusable;
    if (unusable) throw unusable;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid request: offset ${offset}, length ${length}`, { file: this.filename });
    }
    if (offset + length > this.size) {
      throw new QcowError('QCOW_OUT_OF_RANGE', `request [${offset}, +${length}) is beyond the end of the device (${this.size} bytes)`, {
        file: this.filename,
      });
    }
  }
}

/** Join neighbouring extents whose state is the same and whose host offsets run on. */
export function mergeExtents(list: BlockExtent[]): BlockExtent[] {
  const out: BlockExtent[] = [];
  for (const e of list) {
    if (e.length === 0) continue;
    const last = out[out.length - 1];
    if (
      last &&
      last.offset + last.length === e.offset &&
      last.allocated === e.allocated &&
      last.zero === e.zero &&
      last.data === e.data &&
      !!last.compressed === !!e.compressed &&
      !!last.zeroUnknown === !!e.zeroUnknown &&
      last.hostFile === e.hostFile &&
      (last.hostOffset === undefined) === (e.hostOffset === undefined) &&
      (last.hostOffset === undefined || last.hostOffset + last.length === e.hostOffset)
    ) {
      last.length += e.length;
    } else {
      out.push({ ...e });
    }
  }
  return out;
}
