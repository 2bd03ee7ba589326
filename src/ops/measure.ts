/**
 * `qemu-img measure`: how large a new image file would be, for a virtual size or for a copy of a
 * source image: "required" (what convert would write, metadata included) and "fully-allocated"
 * (every cluster present). The numbers follow QEMU's own estimate, which is an upper bound: the
 * metadata of the fully allocated image is always counted.
 *
 * qcow2: header cluster + L2 tables for every cluster + L1 table + refcount structures sized so
 * they also count themselves, + a LUKS header area when encrypted with LUKS; "required" then
 * replaces the data clusters of a full image by the clusters the source really has data in (all of
 * them with a backing file: the new backing file may share nothing). Sources that are qcow2 v3 also
 * report the space their persistent bitmaps need ("bitmaps"). raw: the size, rounded up to 512.
 * QEMU cannot measure other formats (qcow v1 included) and neither do we.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, throwIfAborted } from '../core/errors.js';
import { alignUp, isPowerOfTwo } from '../core/bytes.js';
import { parseSize } from '../core/size.js';
import { ChainStatus } from './chain-status.js';
import { MAX_L1_BYTES } from '../formats/qcow2/layout.js';

export interface MeasureOptions {
  /** Target format: raw or qcow2. */
  format: string;
  /** Target -o options, as given. */
  options?: Record<string, string>;
  /** The option names the target format accepts at create (unknown ones are refused, as qemu-img does). */
  knownOptions?: Record<string, string>;
  /** Measure an empty image of this virtual size... */
  size?: number;
  /** ...or a copy of this image (its whole backing chain as the guest sees it). */
  source?: BlockDevice;
  signal?: AbortSignal;
}

export interface MeasureResult {
  /** Present only when both the source and the target can hold persistent bitmaps. */
  bitmaps?: number;
  required: number;
  'fully-allocated': number;
}

const KiB = 1024;

export async function measure(opts: MeasureOptions): Promise<MeasureResult> {
  if ((opts.size === undefined) === (opts.source === undefined)) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Either --size N or one filename must be specified.');
  const o = { ...(opts.options ?? {}) };
  if (opts.knownOptions) {
    for (const k of Object.keys(o)) if (!(k in opts.knownOptions)) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid parameter '${k}'`);
  }
  if (opts.format === 'raw') return measureRaw(opts);
  if (opts.format === 'qcow2') return measureQcow2(opts, o);
  throw new QcowError('QCOW_UNSUPPORTED', `Block driver '${opts.format}' does not support size measurement`);
}

function measureRaw(opts: MeasureOptions): MeasureResult {
  // Unallocated sectors still count towards a raw file's size.
  const n = opts.source ? opts.source.size : alignUp(opts.size!, 512);
  return { required: n, 'fully-allocated': n };
}

interface Qcow2Geometry {
  clusterSize: number;
  version: 2 | 3;
  refcountBits: number;
  extendedL2: boolean;
  preallocation: string;
  hasBacking: boolean;
  luksPayload: number;
}

function qcow2Geometry(o: Record<string, string>): Qcow2Geometry {
  const extendedL2 = bool(o.extended_l2, 'extended_l2');
  const clusterSize = o.cluster_size !== undefined ? parseSize(o.cluster_size, 'cluster_size') : 64 * KiB;
  if (!isPowerOfTwo(clusterSize) || clusterSize < 512 || clusterSize > 2048 * KiB) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', 'Cluster size must be a power of two between 512 and 2048k');
  }
  if (extendedL2 && clusterSize < 16 * KiB) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  const compat = o.compat ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid compatibility level: '${compat}'`);
  const refcountBits = o.refcount_bits !== undefined ? Number(o.refcount_bits) : 16;
  if (!isPowerOfTwo(refcountBits) || refcountBits > 64) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Refcount width must be a power of two and may not exceed 64 bits');
  if (version < 3 && refcountBits !== 16) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const preallocation = o.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid parameter value: ${preallocation}`);
  const luks = o['encrypt.format'] === 'luks';
  const luksPayload = luks ? alignUp(luksHeaderBytes(o['encrypt.cipher-alg'] ?? 'aes-256', o['encrypt.cipher-mode'] ?? 'xts'), clusterSize) : 0;
  return { clusterSize, version, refcountBits, extendedL2, preallocation, hasBacking: o.backing_file !== undefined, luksPayload };
}

function bool(v: string | undefined, name: string): boolean {
  if (v === undefined || v === 'off' || v === 'false') return false;
  if (v === 'on' || v === 'true') return true;
  throw new QcowError('QCOW_INVALID_ARGUMENT', `Parameter '${name}' expects 'on' or 'off'`);
}

/**
 * Bytes before the payload in a LUKS header as QEMU lays it out: a 4 KiB header, then 8 key slots,
 * each holding the master key split into 4000 stripes, rounded up to 4 KiB.
 */
export function luksHeaderBytes(cipherAlg: string, cipherMode: string): number {
  const m = /-(\d+)$/.exec(cipherAlg);
  const keyBytes = cipherAlg === 'sm4' ? 16 : m ? Number(m[1]) / 8 : NaN;
  if (!Number.isInteger(keyBytes) || keyBytes <= 0) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid parameter value: cipher-alg '${cipherAlg}'`);
  const masterKey = cipherMode === 'xts' ? 2 * keyBytes : keyBytes;
  return 4096 + 8 * alignUp(masterKey * 4000, 4096);
}

/**
 * Refcount table and blocks (bytes) for an image of `clusters` clusters, counting the clusters the
 * refcount structures themselves take: iterate until the count stops changing.
 */
export function refcountMetadataBytes(clusters: number, clusterSize: number, refcountBits: number): number {
  const perBlock = (clusterSize * 8) / refcountBits;
  const blocksPerTableCluster = clusterSize / 8;
  let table = 0;
  let blocks = 0;
  let total = 0;
  for (;;) {
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    const next = clusters + blocks + table;
    if (next === total) break;
    total = next;
  }
  return (blocks + table) * clusterSize;
}

/** File size of a fully allocated qcow2 image of `virtualSize` bytes (metadata included). */
export function qcow2FullSize(virtualSize: number, clusterSize: number, refcountBits: number, extendedL2: boolean): number {
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const data = alignUp(virtualSize, clusterSize);
  let meta = clusterSize; // the header
  const l2Entries = alignUp(data / clusterSize, clusterSize / l2EntryBytes);
  meta += l2Entries * l2EntryBytes;
  const l1Entries = alignUp((l2Entries * l2EntryBytes) / clusterSize, clusterSize / 8);
  meta += l1Entries * 8;
  meta += refcountMetadataBytes((meta + data) / clusterSize, clusterSize, refcountBits);
  return meta + data;
}

async function measureQcow2(opts: MeasureOptions, o: Record<string, string>): Promise<MeasureResult> {
  const g = qcow2Geometry(o);
  const cs = g.clusterSize;
  let virtualSize = alignUp(opts.size ?? 0, cs);
  const l2EntryBytes = g.extendedL2 ? 16 : 8;
  const l2Tables = Math.ceil(virtualSize / cs / (cs / l2EntryBytes));
  if (l2Tables * 8 > MAX_L1_BYTES) throw new QcowError('QCOW_INVALID_ARGUMENT', 'The image size is too large (try using a larger cluster size)');

  let required = 0;
  if (opts.source) {
    const src = opts.source;
    virtualSize = alignUp(src.size, cs);
    if (g.hasBacking) required = virtualSize;
    else required = await dataClusterBytes(src, cs, opts.signal);
  }
  if (g.preallocation === 'full' || g.preallocation === 'falloc') required = virtualSize;
  const full = g.luksPayload + qcow2FullSize(virtualSize, cs, g.refcountBits, g.extendedL2);
  const out: MeasureResult = { required: full - virtualSize + required, 'fully-allocated': full };
  if (g.version >= 3 && opts.source && (await holdsPersistentBitmaps(opts.source))) {
    return { bitmaps: await bitmapBytes(opts.source, cs), ...out };
  }
  return out;
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

/** qemu supports persistent bitmaps in qcow2 v3 images only. */
async function holdsPersistentBitmaps(src: BlockDevice): Promise<boolean> {
  if (src.format !== 'qcow2') return false;
  const d = await src.describe();
  return d.formatSpecific?.data.compat === '1.1';
}

/**
 * Space for copying the source's persistent bitmaps: per bitmap its data clusters (one bit per
 * granularity bytes) and its table (8 bytes per data cluster, whole clusters), plus the directory
 * (24-byte entries with the name, 8-byte aligned) in whole clusters.
 */
async function bitmapBytes(src: BlockDevice, cs: number): Promise<number> {
  const d = await src.describe();
  const list = (d.formatSpecific?.data.bitmaps ?? []) as { name: string; granularity: number }[];
  let bytes = 0;
  let directory = 0;
  for (const b of list) {
    const bitmapBytes = Math.ceil(Math.ceil(src.size / b.granularity) / 8);
    const clusters = Math.ceil(bitmapBytes / cs);
    bytes += clusters * cs + alignUp(clusters * 8, cs);
    directory += alignUp(24 + new TextEncoder().encode(b.name).length, 8);
  }
  return bytes + alignUp(directory, cs);
}
