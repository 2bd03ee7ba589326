/**
 * `qemu-img measure`: how large a new image file would be, for a virtual size or for a copy of a
 * source image: "required" (what convert would write, metadata included) and "fully-allocated"
 * (every cluster present). Each format answers for itself (`ImageFormat.measure`, QEMU's
 * `bdrv_measure`: qcow2 in formats/qcow2/measure.ts, raw the size rounded up to 512); this
 * module checks the request and scans the source for the clusters that hold data. QEMU cannot
 * measure qcow v1 and neither do we.
 */
import type { BlockDevice, ImageFormat, MeasureResult } from '../core/block-device.js';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { alignUp } from '../core/bytes.js';
import { ChainStatus } from './chain-status.js';

export type { MeasureResult };

/** What {@link measure} measures: an image of `format`, for `size` or for a copy of `source`. */
export interface MeasureOptions {
  /** The new image's format (`builtinFormats().get('qcow2')`, `rawFormat`). */
  format: ImageFormat;
  /** The new image's -o options, as given. */
  options?: Record<string, string>;
  /** The option names to accept (usually `format.createOptions`); others are refused, as qemu-img does. Absent: the format alone checks. */
  knownOptions?: Record<string, string>;
  /** Measure an empty image of this virtual size... */
  size?: number;
  /** ...or a copy of this image (its whole backing chain as the guest sees it). */
  source?: BlockDevice;
  /** Stops the scan of the source; it then fails with QCOW_ABORTED. */
  signal?: AbortSignal;
}

/**
 * The file size a new image of `options.format` would take, in qemu-img measure's terms.
 * QCOW_UNSUPPORTED for formats that cannot be measured (qcow v1, as in QEMU).
 *
 * @example
 * ```ts
 * import { builtinFormats, measure } from 'qcow';
 * import { openImage } from 'qcow/node';
 *
 * const qcow2 = builtinFormats().get('qcow2');
 * console.log(await measure({ format: qcow2, size: 2 ** 30 })); // { required: 393216, 'fully-allocated': 1074135040 }
 * const src = await openImage('disk.raw', { readOnly: true });
 * console.log((await measure({ format: qcow2, source: src, options: { cluster_size: '4096' } })).required);
 * await src.close();
 * ```
 */
export async function measure(opts: MeasureOptions): Promise<MeasureResult> {
  if ((opts.size === undefined) === (opts.source === undefined)) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Either --size N or one filename must be specified.');
  const options = { ...(opts.options ?? {}) };
  if (opts.knownOptions) {
    for (const k of Object.keys(options)) if (!(k in opts.knownOptions)) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid parameter '${k}'`);
  }
  const { format, source, signal } = opts;
  if (!format.measure) throw new QcowError('QCOW_UNSUPPORTED', `Block driver '${format.name}' does not support size measurement`);
  return format.measure({
    options,
    size: opts.size,
    source,
    signal,
    sourceDataBytes: source ? (clusterSize) => dataClusterBytes(source, clusterSize, signal) : undefined,
  });
}

/** Bytes of whole target clusters that hold source data (zero and unallocated ranges need none). */
async function dataClusterBytes(src: BlockDevice, cs: number, signal?: AbortSignal): Promise<number> {
  const status = new ChainStatus(src);
  let counted = 0; // clusters below this offset are already counted
  let bytes = 0;
  for (let off = 0; off < src.size; ) {
    throwIfAborted(signal);
    const e = await status.at(off, src.size - off);
    if (e.present && !e.zero && e.data) {
      const from = Math.max(counted, Math.floor(off / cs) * cs);
      const to = alignUp(off + e.length, cs);
      if (to > from) bytes += to - from;
      counted = Math.max(counted, to);
    }
    off += e.length;
  }
  return bytes;
}
