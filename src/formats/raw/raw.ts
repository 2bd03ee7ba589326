/**
 * Raw images: guest offset = file offset. The file's length is the virtual size. Or, with a window
 * (QEMU's raw `offset` and `size` options), a part of the file: guest offset + the window's start.
 */
import type { BlockExtent, CreateOptions, ImageDescription, ImageFormat, OpenOptions, PlacedRange, PlainExtent, PlainRun, RawWindow, ResizeOptions, WriteOptions, ZeroOptions } from '../../core/block-device.js';
import { growStore } from '../../storage/preallocate.js';
import { DeviceBase } from '../../core/device-base.js';
import { QcowError, unsupported } from '../../core/errors.js';
import { alignUp } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';

export class RawDevice extends DeviceBase {
  readonly format = 'raw';
  readonly clusterSize = 512;

  constructor(
    store: ByteStore,
    size: number,
    readOnly: boolean,
    /** Where the guest disk starts in the file (the window's offset). */
    private readonly base = 0,
    /** A window with a size: the disk neither grows nor shrinks (QEMU: "fixed-size raw disks"). */
    private readonly fixedSize = false,
    /** Opened with a window (even one over the whole file). */
    private readonly windowed = false,
    /** See OpenOptions.probedHeader: set when the format was probed, not given. */
    private readonly probedHeader?: (head: Uint8Array) => string | undefined,
  ) {
    super(store, size, readOnly);
  }

  /**
   * Whether block 0 takes only writes that leave no other format's header there (the format was
   * probed: OpenOptions.probedHeader). Writers that go around doWrite (convert's native copy loop,
   * copy offload) must not take such a target.
   */
  get restrictsBlockZero(): boolean {
    return this.probedHeader !== undefined;
  }

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    await this.store.read(this.base + offset, into);
  }

  protected async doWrite(offset: number, data: Uint8Array, _options: WriteOptions): Promise<void> {
    if (offset < PROBE_BYTES && this.probedHeader) await this.checkBlockZero(offset, data);
    await this.store.write(this.base + offset, data);
  }

  /**
   * Refuse a change that leaves block 0 of a probed raw image looking like another format's header
   * (see OpenOptions.probedHeader). `data` undefined: the range becomes zeros. QEMU checks data
   * writes only, whole sectors; zeros are checked too here, since clearing bytes can turn a header
   * that no probe accepts into one that a probe does (a version field read as 1 once its high
   * byte is gone), and the sector is read and patched so that writes of any alignment are seen.
   */
  private async checkBlockZero(offset: number, data: Uint8Array | undefined, length = data?.length ?? 0): Promise<void> {
    const head = new Uint8Array(PROBE_BYTES);
    const have = Math.min(PROBE_BYTES, this.size);
    if (offset > 0 || length < have) await this.store.read(this.base, head.subarray(0, have));
    const end = Math.min(PROBE_BYTES, offset + length);
    if (data) head.set(data.subarray(0, end - offset), offset);
    else head.fill(0, offset, end);
    const format = this.probedHeader!(head);
    if (format !== undefined) {
      throw new QcowError(
        'QCOW_READ_ONLY',
        `refusing to write a ${format} header into block 0 of an image whose format was probed as raw (give the format, raw, to allow it)`,
        { file: this.filename, errno: 'EPERM' },
      );
    }
  }

  /** Every guest byte is the file's byte at the same offset (holes included: they read as zeros). */
  async plainExtents(offset: number, length: number): Promise<PlainExtent[]> {
    this.checkRequest(offset, length);
    return [{ offset, length, store: this.store, hostOffset: this.base + offset }];
  }

  /**
   * See BlockDevice.plainRunNow: where the store tells holes from data (they are zeros to block
   * status), only inside the run of data it found last.
   */
  plainRunNow(offset: number, length: number): PlainRun | undefined {
    const s = this.store;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.size) return undefined;
    if (s.dataRuns && !s.dataKnownNow?.(this.base + offset, length)) return undefined;
    return { store: s, hostOffset: this.base + offset };
  }

  async writePlaced(offset: number, length: number, put: (range: PlacedRange) => Promise<void>): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, length);
    // Bytes put in place are never seen here, so block 0 of a probed raw image cannot be checked.
    if (offset < PROBE_BYTES && length > 0 && this.probedHeader) {
      throw new QcowError('QCOW_READ_ONLY', 'copy offload into block 0 of an image whose format was probed as raw is refused (give the format, raw)', { file: this.filename, errno: 'EPERM' });
    }
    if (length > 0) await put({ offset, length, store: this.store, hostOffset: this.base + offset }).catch(this.nameTheImage);
  }

  /**
   * As QEMU's file driver: a zero write that may unmap punches a hole, one that may not zeroes the
   * range in place (FALLOC_FL_ZERO_RANGE); where the store cannot (no host addon, a filesystem
   * without the call) zeros are written, or a fast-only request is refused.
   */
  protected override async doWriteZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    if (offset < PROBE_BYTES && this.probedHeader) await this.checkBlockZero(offset, undefined, length);
    const call = options.mayUnmap ? this.store.punchHole : this.store.zeroRange;
    if (call && (await this.tryHostCall(() => call.call(this.store, this.base + offset, length)))) return;
    await super.doWriteZeroes(offset, length, options);
  }

  /** Discard gives the range's host blocks back (it then reads as zeros, as after QEMU's discard on a file). */
  protected override async doDiscard(offset: number, length: number): Promise<void> {
    const punch = this.store.punchHole;
    if (punch && offset < PROBE_BYTES && this.probedHeader) await this.checkBlockZero(offset, undefined, length);
    if (punch) await this.tryHostCall(() => punch.call(this.store, this.base + offset, length));
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
    const base = this.base;
    // A window's bytes are its file's, which map names (the device may go by a json:{...} name).
    const file = this.windowed ? { hostFile: this.store.name } : {};
    if (!this.store.dataRuns) return [{ offset, length, allocated: true, zero: false, data: true, hostOffset: base + offset, ...file }];
    return (await this.store.dataRuns(base + offset, length)).map((r) => ({ offset: r.offset - base, length: r.length, allocated: true, zero: !r.data, data: r.data, hostOffset: r.offset, ...file }));
  }

  async describe(): Promise<ImageDescription> {
    return { format: 'raw', virtualSize: this.size };
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.store.flush();
  }

  async resize(size: number, options: ResizeOptions = {}): Promise<void> {
    this.checkWritable();
    if (this.fixedSize) throw new QcowError('QCOW_UNSUPPORTED', 'Cannot resize fixed-size raw disks', { file: this.filename });
    if (size < this.size && !options.shrink) {
      throw new QcowError('QCOW_INVALID_ARGUMENT', 'Use the --shrink option to perform a shrink operation.', { file: this.filename });
    }
    // The file grows as its driver would grow it with the preallocation asked for.
    if (size > this.size) await growStore(this.store, this.base + this.size, this.base + size, options.preallocation);
    else await this.store.truncate(this.base + size);
    this.size = size;
  }

  protected async doClose(): Promise<void> {
    await this.store.close();
  }
}

/** How much of the first sector format probing looks at (QEMU's BLOCK_PROBE_BUF_SIZE; openImage's probe reads as much). */
const PROBE_BYTES = 512;

/** The part of a file of `fileSize` bytes that `window` names, checked as QEMU's raw driver checks it. */
function windowIn(fileSize: number, window: RawWindow): { offset: number; size: number } {
  const offset = window.offset ?? 0;
  if (!Number.isSafeInteger(offset) || offset < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid offset ${offset}`);
  if (offset > fileSize) throw new QcowError('QCOW_INVALID_ARGUMENT', `Offset (${offset}) cannot be greater than size of the containing file (${fileSize})`);
  const size = window.size;
  if (size === undefined) return { offset, size: fileSize - offset };
  if (!Number.isSafeInteger(size) || size < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid size ${size}`);
  // (QEMU's message has the two spaces.)
  if (fileSize - offset < size) throw new QcowError('QCOW_INVALID_ARGUMENT', `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the  actual size of the containing file (${fileSize})`);
  if (size % 512 !== 0) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Specified size is not multiple of 512');
  return { offset, size };
}

/** The raw format: the file is the guest disk, byte for byte. Probing picks it only when no other format matches. */
export const rawFormat: ImageFormat = {
  name: 'raw',
  probe: () => 1, // the fallback: anything is a raw image, with the least confidence
  async open(store: ByteStore, options: OpenOptions = {}) {
    const readOnly = options.readOnly ?? store.readOnly;
    const guard = readOnly ? undefined : options.probedHeader;
    if (!options.rawWindow) return new RawDevice(store, await store.size(), readOnly, 0, false, false, guard);
    const { offset, size } = windowIn(await store.size(), options.rawWindow);
    return new RawDevice(store, size, readOnly, offset, options.rawWindow.size !== undefined, true, guard);
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
