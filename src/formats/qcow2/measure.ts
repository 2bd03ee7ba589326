/**
 * `measure` for qcow2 (`ImageFormat.measure`, QEMU's `qcow2_measure`): the file size of a new
 * qcow2 image, for a virtual size or for a copy of a source image. The numbers follow QEMU's
 * estimate, which is an upper bound: the metadata of the fully allocated image is always counted.
 *
 * Fully allocated: header cluster + L2 tables for every cluster + L1 table + refcount structures
 * sized so they also count themselves, + a LUKS header area when encrypted with LUKS. Required:
 * the same with the data clusters of the full image replaced by the clusters the source really
 * has data in (all of them with a backing file: the new backing file may share nothing, and all
 * of them with falloc/full preallocation). qcow2 v3 sources also report the space their
 * persistent bitmaps need ("bitmaps").
 *
 * The -o checks are qemu-img measure's, which are not all create's: measure takes options create
 * refuses (compat=0.10 with lazy_refcounts, an unknown compression type, no LUKS secret) and words
 * some refusals differently ("Invalid compatibility level"); the limits they share are create's
 * (cluster sizes, refcount widths, the L1 table).
 */
import type { BlockDevice, MeasureRequest, MeasureResult } from '../../core/block-device.js';
import { invalidArgument } from '../../core/errors.js';
import { alignUp } from '../../core/bytes.js';
import { parseSize } from '../../core/size.js';
import { LUKS_KEY_MATERIAL_ALIGN, LUKS_SLOT_COUNT, LUKS_STRIPES } from '../../crypto/luks-header.js';
import { MAX_L1_BYTES, l1EntriesFor, qcow2Geometry } from './layout.js';
import { checkRefcountBits } from './refcount.js';
import { checkClusterSize, checkExtendedL2ClusterSize, onOff } from './create.js';

/** What the -o options say about the image to measure. */
interface MeasureSettings {
  clusterSize: number;
  version: 2 | 3;
  refcountBits: number;
  extendedL2: boolean;
  preallocation: string;
  hasBacking: boolean;
  /** Bytes of the LUKS header area in front of the data, whole clusters (0 without LUKS). */
  luksPayload: number;
}

function measureSettings(o: Record<string, string>): MeasureSettings {
  const extendedL2 = onOff('extended_l2', o.extended_l2);
  const clusterSize = o.cluster_size !== undefined ? parseSize(o.cluster_size, 'cluster_size') : 65536;
  checkClusterSize(clusterSize);
  if (extendedL2) checkExtendedL2ClusterSize(clusterSize);
  const compat = o.compat ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw invalidArgument(`Invalid compatibility level: '${compat}'`);
  const refcountBits = o.refcount_bits !== undefined ? Number(o.refcount_bits) : 16;
  checkRefcountBits(refcountBits);
  if (version < 3 && refcountBits !== 16) {
    throw invalidArgument('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const preallocation = o.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) throw invalidArgument(`invalid parameter value: ${preallocation}`);
  const luks = o['encrypt.format'] === 'luks';
  const luksPayload = luks ? alignUp(luksHeaderBytes(o['encrypt.cipher-alg'] ?? 'aes-256', o['encrypt.cipher-mode'] ?? 'xts'), clusterSize) : 0;
  return { clusterSize, version, refcountBits, extendedL2, preallocation, hasBacking: o.backing_file !== undefined, luksPayload };
}

/**
 * Bytes before the payload in a LUKS header as QEMU lays it out: the header in its own aligned
 * area, then each key slot's material (the master key split into stripes), each area aligned.
 */
export function luksHeaderBytes(cipherAlg: string, cipherMode: string): number {
  const m = /-(\d+)$/.exec(cipherAlg);
  const keyBytes = cipherAlg === 'sm4' ? 16 : m ? Number(m[1]) / 8 : NaN;
  if (!Number.isInteger(keyBytes) || keyBytes <= 0) throw invalidArgument(`Invalid parameter value: cipher-alg '${cipherAlg}'`);
  const masterKey = cipherMode === 'xts' ? 2 * keyBytes : keyBytes;
  return LUKS_KEY_MATERIAL_ALIGN + LUKS_SLOT_COUNT * alignUp(masterKey * LUKS_STRIPES, LUKS_KEY_MATERIAL_ALIGN);
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
  const g = qcow2Geometry(Math.log2(clusterSize), extendedL2);
  const data = alignUp(virtualSize, clusterSize);
  let meta = clusterSize; // the header
  const l2Entries = alignUp(data / clusterSize, g.l2Entries);
  meta += l2Entries * g.l2EntryBytes;
  const l1Entries = alignUp((l2Entries * g.l2EntryBytes) / clusterSize, clusterSize / 8);
  meta += l1Entries * 8;
  meta += refcountMetadataBytes((meta + data) / clusterSize, clusterSize, refcountBits);
  return meta + data;
}

/** The qcow2 answer to {@link MeasureRequest}: what the format's `measure` returns. */
export async function measureQcow2(request: MeasureRequest): Promise<MeasureResult> {
  const s = measureSettings(request.options);
  const cs = s.clusterSize;
  const { source } = request;
  let virtualSize = alignUp(request.size ?? 0, cs);
  if (l1EntriesFor(virtualSize, qcow2Geometry(Math.log2(cs), s.extendedL2)) * 8 > MAX_L1_BYTES) {
    throw invalidArgument('The image size is too large (try using a larger cluster size)');
  }
  let required = 0;
  if (source) {
    virtualSize = alignUp(source.size, cs);
    if (s.hasBacking) required = virtualSize;
    else required = await request.sourceDataBytes!(cs);
  }
  if (s.preallocation === 'full' || s.preallocation === 'falloc') required = virtualSize;
  const full = s.luksPayload + qcow2FullSize(virtualSize, cs, s.refcountBits, s.extendedL2);
  const out: MeasureResult = { required: full - virtualSize + required, 'fully-allocated': full };
  if (s.version >= 3 && source && (await holdsPersistentBitmaps(source))) {
    return { bitmaps: await bitmapBytes(source, cs), ...out };
  }
  return out;
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
