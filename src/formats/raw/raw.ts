/** Raw images: guest offset = file offset. The file's length is the virtual size. */
import type { BlockExtent, CreateOptions, ImageDescription, ImageFormat, OpenOptions, PlacedRange, PlainExtent, PlainRun, WriteOptions, ZeroOptions } from '../../core/block-device.js';
import { DeviceBase } from '../../core/device-base.js';
import { QcowError, unsupported } from '../../core/errors.js';
import { alignUp } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';

export class RawDevice extends DeviceBase {
  readonly format = 'raw';
  readonly clusterSize = 512;

  constructor(store: ByteStore, size: number, readOnly: boolean) {
    super(store, size, readOnly);
  }

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    await this.store.read(offset, into);
  }

  protected async doWrite(offset: number, data: Uint8Array, _options: WriteOptions): Promise<void> {
    await this.store.write(offset, data);
  }

  /** Every guest byte is the file's byte at the same offset (holes included: they read as zeros). */
  async plainExtents(offset: number, length: number): Promise<PlainExtent[]> {
    this.checkRequest(offset, length);
    return [{ offset, length, store: this.store, hostOffset: offset }];
  }

  /**
   * See BlockDevice.plainRunNow: where the store tells holes from data (they are zeros to block
   * status), only inside the run of data it found last.
   */
  plainRunNow(offset: number, length: number): PlainRun | undefined {
    const s = this.store;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.size) return undefined;
    if (s.dataRuns && !s.dataKnownNow?.(offset, length)) return undefined;
    return { store: s, hostOffset: offset };
  }

  async writePlaced(offset: number, length: number, put: (range: PlacedRange) => Promise<void>): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, length);
    if (length > 0) await put({ offset, length, store: this.store, hostOffset: offset }).catch(this.nameTheImage);
  }

  /**
   * As QEMU's file driver: a zero write that may unmap punches a hole, one that may not zeroes the
   * range in place (FALLOC_FL_ZERO_RANGE); where the store cannot (no host addon, a filesystem
   * without the call) zeros are written, or a fast-only request is refused.
   */
  protected override async doWriteZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    const call = options.mayUnmap ? this.store.punchHole : this.store.zeroRange;
    if (call && (await this.tryHostCall(() => call.call(this.store, offset, length)))) return;
    await super.doWriteZeroes(offset, length, options);
  }

  /** Discard gives the range's host blocks back (it then reads as zeros, as after QEMU's discard on a file). */
  protected override async doDiscard(offset: number, length: number): Promise<void> {
    const punch = this.store.punchHole;
    if (punch) await this.tryHostCall(() => punch.call(this.store, offset, length));
  }

  /** Run a sparse-file call; false when the filesystem lacks it (the caller then does without). */
  private async tryHostCall(call: () => Promise<void>): Promise<boolean> {
    try {
      await call();
      return true;
    } catch (e) {
      if (e instanceof QcowError && e.code === 'QCOW_UNSUPPORTED') return false;
      throw e;
    }
  }

  /**
   * Data where the file holds data, zeros where it has holes (as QEMU's file driver reports them:
   * present, zero, not data). Without a way to see holes every byte counts as data.
   */
  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    if (!this.store.dataRuns) return [{ offset, length, allocated: true, zero: false, data: true, hostOffset: offset }];
    return (await this.store.dataRuns(offset, length)).map((r) => ({ offset: r.offset, length: r.length, allocated: true, zero: !r.data, data: r.data, hostOffset: r.offset }));
  }

  async describe(): Promise<ImageDescription> {
    return { format: 'raw', virtualSize: this.size };
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.store.flush();
  }

  async resize(size: number, options: { shrink?: boolean } = {}): Promise<void> {
    this.checkWritable();
    if (size < this.size && !options.shrink) {
      throw new QcowError('QCOW_INVALID_ARGUMENT', 'Use the --shrink option to perform a shrink operation.', { file: this.filename });
    }
    await this.store.truncate(size);
    this.size = size;
  }

  protected async doClose(): Promise<void> {
    await this.store.close();
  }
}

/** The raw format: the file is the guest disk, byte for byte. Probing picks it only when no other format matches. */
export const rawFormat: ImageFormat = {
  name: 'raw',
  probe: () => 1, // the fallback: anything is a raw image, with the least confidence
  async open(store: ByteStore, options: OpenOptions = {}) {
    return new RawDevice(store, await store.size(), options.readOnly ?? store.readOnly);
  },
  async create(store: ByteStore, options: CreateOptions) {
    if (options.backingFile) throw unsupported("raw images cannot have a backing file ('backing_file' is not an option of raw)");
    for (const key of Object.keys(options.options ?? {})) {
      if (key !== 'size' && key !== 'preallocation') throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid parameter '${key}' for format raw`);
    }
    const prealloc = options.options?.preallocation ?? 'off';
    if (!['off', 'full', 'falloc'].includes(prealloc)) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid preallocation mode: '${prealloc}'`);
    await store.truncate(0);
    if (prealloc === 'falloc' && store.allocate && options.size > 0) {
      // Blocks reserved without writing them, as qemu-img's falloc (posix_fallocate).
      await store.allocate(0, options.size);
    } else if (prealloc === 'off' || prealloc === 'falloc') {
      await store.truncate(options.size);
    } else {
      const chunk = new Uint8Array(Math.min(options.size, 1 << 20));
      for (let off = 0; off < options.size; off += chunk.length) {
        await store.write(off, chunk.subarray(0, Math.min(chunk.length, options.size - off)));
      }
    }
  },
  createOptions: { size: 'Virtual disk size', preallocation: 'Preallocation mode (allowed values: off, falloc, full)' },
  // Every byte of the virtual disk is in the file, allocated or not; sizes are whole sectors.
  async measure(request) {
    const n = request.source ? request.source.size : alignUp(request.size ?? 0, 512);
    return { required: n, 'fully-allocated': n };
  },
};
