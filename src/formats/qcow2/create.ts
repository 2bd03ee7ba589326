/**
 * `create` for qcow2: the -o options qemu-img 7.2 takes, its defaults and its checks (with its
 * messages), and its layout: header in cluster 0, a one-cluster refcount table in cluster 1, the
 * first refcount block in cluster 2, then the L1 table (not padded to a whole cluster), then the
 * LUKS area, then (preallocation) each L2 table followed by the data clusters it maps.
 */
import type { CreateOptions } from '../../core/block-device.js';
import { QcowError, invalidArgument } from '../../core/errors.js';
import { alignUp, isExactByteCount, isPowerOfTwo, setU64 } from '../../core/bytes.js';
import { parseSize } from '../../core/size.js';

/** QEMU's unit of disk size. */
const SECTOR = 512;
import type { ByteStore } from '../../storage/types.js';
import { COMPRESSION_ZLIB, COMPRESSION_ZSTD, qemuFeatureNames, V2_HEADER_LENGTH, V3_HEADER_LENGTH, encodeHeader, type Qcow2Header } from './header.js';
import { AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2 } from './features.js';
import { MAX_L1_BYTES, l1EntriesFor, qcow2Geometry } from './layout.js';
import { setL1Entry } from './l1-entry.js';
import { setL2Entry, standardL2Entry } from './l2-entry.js';
import { checkRefcountBits, setRefcount } from './refcount.js';
// The allocator only when an image is made: this module's options are the format's, which every
// image open sets up (format.ts).
import type { Refcounts } from './alloc.js';

export const QCOW2_CREATE_OPTIONS: Record<string, string> = {
  size: 'Virtual disk size',
  compat: 'Compatibility level (v2 [0.10], v3 [1.1])',
  backing_file: 'File name of a base image',
  backing_fmt: 'Image format of the base image',
  data_file: 'File name of an external data file',
  data_file_raw: 'The external data file must stay valid as a raw image',
  encryption: 'Encrypt the image with format "aes" (deprecated spelling of encrypt.format=aes)',
  'encrypt.format': 'Encrypt the image, format choices: "aes", "luks"',
  'encrypt.key-secret': 'accepted for qemu-img compatibility: the password comes from --password-file',
  'encrypt.iter-time': 'LUKS: milliseconds of PBKDF2 per key slot unlock (default 2000)',
  'encrypt.cipher-alg': 'LUKS: aes-128 or aes-256 (default)',
  'encrypt.cipher-mode': 'LUKS: xts (default) or cbc',
  'encrypt.ivgen-alg': 'LUKS: plain64 (default) or essiv',
  'encrypt.hash-alg': 'LUKS: sha256 (default), sha1, sha512',
  cluster_size: 'qcow2 cluster size (default 64k)',
  preallocation: 'Preallocation mode (allowed values: off, metadata, falloc, full)',
  lazy_refcounts: 'Postpone refcount updates',
  refcount_bits: 'Width of a reference count entry in bits (default 16)',
  compression_type: 'Compression method used for image cluster compression (zlib, zstd)',
  extended_l2: 'Extended L2 tables (32 subclusters per cluster)',
};

export interface Qcow2CreateSettings {
  version: 2 | 3;
  clusterBits: number;
  refcountBits: number;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  compressionType: number;
  preallocation: 'off' | 'metadata' | 'falloc' | 'full';
  encryption?: 'aes' | 'luks';
  luks: { iterTimeMs?: number; cipherAlg?: 'aes-128' | 'aes-256'; cipherMode?: 'xts' | 'cbc'; ivGen?: 'plain64' | 'essiv'; hashAlg?: 'sha256' | 'sha1' | 'sha512' };
  dataFile?: string;
  dataFileRaw: boolean;
}

/** An on/off -o option (absent: off), in qemu-img's words when it is neither. */
export const onOff = (key: string, v: string | undefined): boolean => {
  if (v === undefined || v === 'off' || v === 'false') return false;
  if (v === 'on' || v === 'true') return true;
  throw invalidArgument(`Parameter '${key}' expects 'on' or 'off'`);
};

/** The cluster sizes qemu accepts for new images (measure checks them too). */
export function checkClusterSize(clusterSize: number): void {
  if (!isPowerOfTwo(clusterSize) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) throw invalidArgument('Cluster size must be a power of two between 512 and 2048k');
}

/** Extended L2 entries split a cluster in 32 subclusters of at least 512 bytes. */
export function checkExtendedL2ClusterSize(clusterSize: number): void {
  if (clusterSize < 16384) throw invalidArgument('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
}

/** Validate -o options the way qemu-img does, with its defaults. */
export function parseCreateOptions(o: Record<string, string>, hasBacking: boolean): Qcow2CreateSettings {
  for (const k of Object.keys(o)) if (!(k in QCOW2_CREATE_OPTIONS)) throw invalidArgument(`Invalid parameter '${k}'`);
  const compat = o.compat ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw invalidArgument(`Parameter 'version' does not accept value '${compat}'`);
  const clusterSize = o.cluster_size !== undefined ? parseSize(o.cluster_size, 'cluster_size') : 65536;
  checkClusterSize(clusterSize);
  const refcountBits = o.refcount_bits !== undefined ? Number(o.refcount_bits) : 16;
  checkRefcountBits(refcountBits);
  const lazyRefcounts = onOff('lazy_refcounts', o.lazy_refcounts);
  const extendedL2 = onOff('extended_l2', o.extended_l2);
  const ctype = o.compression_type ?? 'zlib';
  if (ctype !== 'zlib' && ctype !== 'zstd') throw invalidArgument(`Parameter 'compression-type' does not accept value '${ctype}'`);
  const prealloc = o.preallocation ?? 'off';
  if (prealloc !== 'off' && prealloc !== 'metadata' && prealloc !== 'falloc' && prealloc !== 'full') throw invalidArgument(`Parameter 'preallocation' does not accept value '${prealloc}'`);
  if (o.encryption !== undefined && o['encrypt.format'] !== undefined) throw invalidArgument("'encrypt.format' and its alias 'encryption' can't be used at the same time");
  let encryption: 'aes' | 'luks' | undefined;
  if (onOff('encryption', o.encryption)) encryption = 'aes';
  if (o['encrypt.format'] !== undefined) {
    const f = o['encrypt.format'];
    if (f !== 'aes' && f !== 'luks') throw invalidArgument(`Parameter 'encrypt.format' does not accept value '${f}'`);
    encryption = f;
  }
  const dataFileRaw = onOff('data_file_raw', o.data_file_raw);
  const v3 = '(use version=v3 or greater)';
  if (version === 2) {
    if (lazyRefcounts) throw invalidArgument(`Lazy refcounts only supported with compatibility level 1.1 and above ${v3}`);
    if (refcountBits !== 16) throw invalidArgument(`Different refcount widths than 16 bits require compatibility level 1.1 or above ${v3}`);
    if (extendedL2) throw invalidArgument(`Extended L2 entries are only supported with compatibility level 1.1 and above ${v3}`);
    if (ctype !== 'zlib') throw invalidArgument(`Non-zlib compression type is only supported with compatibility level 1.1 and above ${v3}`);
    if (o.data_file !== undefined) throw invalidArgument(`External data files are only supported with compatibility level 1.1 and above ${v3}`);
  }
  if (extendedL2) checkExtendedL2ClusterSize(clusterSize);
  if (dataFileRaw && o.data_file === undefined) throw invalidArgument('data-file-raw requires data-file');
  if (dataFileRaw && hasBacking) throw invalidArgument('Backing file and data-file-raw cannot be used at the same time');
  const iter = o['encrypt.iter-time'];
  const luks: Qcow2CreateSettings['luks'] = {};
  if (iter !== undefined) {
    luks.iterTimeMs = Number(iter);
    if (!Number.isSafeInteger(luks.iterTimeMs) || luks.iterTimeMs <= 0) throw invalidArgument(`Parameter 'encrypt.iter-time' expects a positive number, not '${iter}'`);
  }
  if (o['encrypt.cipher-alg'] !== undefined) luks.cipherAlg = o['encrypt.cipher-alg'] as 'aes-128' | 'aes-256';
  if (o['encrypt.cipher-mode'] !== undefined) luks.cipherMode = o['encrypt.cipher-mode'] as 'xts' | 'cbc';
  if (o['encrypt.ivgen-alg'] !== undefined) luks.ivGen = o['encrypt.ivgen-alg'] as 'plain64' | 'essiv';
  if (o['encrypt.hash-alg'] !== undefined) luks.hashAlg = o['encrypt.hash-alg'] as 'sha256' | 'sha1' | 'sha512';
  return {
    version,
    clusterBits: Math.log2(clusterSize),
    refcountBits,
    lazyRefcounts,
    extendedL2,
    compressionType: ctype === 'zstd' ? COMPRESSION_ZSTD : COMPRESSION_ZLIB,
    preallocation: prealloc,
    encryption,
    luks,
    dataFile: o.data_file,
    dataFileRaw,
  };
}

/** The header of a new image, before the L1 and encryption are placed. */
export function newHeader(s: Qcow2CreateSettings, size: number, backingFile?: string, backingFormat?: string): Qcow2Header {
  const cs = 2 ** s.clusterBits;
  let incompat = 0n;
  if (s.compressionType !== COMPRESSION_ZLIB) incompat |= INCOMPAT_COMPRESSION;
  if (s.extendedL2) incompat |= INCOMPAT_EXTL2;
  if (s.dataFile !== undefined) incompat |= INCOMPAT_DATA_FILE;
  return {
    version: s.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: s.clusterBits,
    size,
    cryptMethod: s.encryption === 'aes' ? 1 : s.encryption === 'luks' ? 2 : 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: cs,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompat,
    compatibleFeatures: s.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: s.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
    refcountOrder: Math.log2(s.refcountBits),
    headerLength: s.version === 2 ? V2_HEADER_LENGTH : V3_HEADER_LENGTH,
    compressionType: s.compressionType,
    backingFile,
    backingFormat,
    // qemu 7.2 leaves the table out of images with clusters of 4 KiB or less (checked: 512..4k none, 8k on).
    featureNames: qemuFeatureNames(s.version, s.clusterBits),
    dataFile: s.dataFile,
    unknownExtensions: [],
  };
}

export async function createQcow2(store: ByteStore, options: CreateOptions): Promise<void> {
  const o = { ...(options.options ?? {}) };
  delete o.size;
  const s = parseCreateOptions(o, options.backingFile !== undefined);
  if (!isExactByteCount(options.size)) throw invalidArgument(`invalid image size ${options.size}`);
  // Whole sectors, rounded up as qemu-img does: QEMU reads a header size in sectors, rounding
  // down, so an odd size stored as given would cut the last bytes off the disk QEMU sees (a 1000000-
  // byte raw converted to qcow2 lost 64 bytes in QEMU's eyes).
  const size = alignUp(options.size, SECTOR);
  if (s.encryption && options.password === undefined) throw invalidArgument("Parameter 'encrypt.key-secret' is required for cipher (give --password-file)");
  const cs = 2 ** s.clusterBits;
  const g = qcow2Geometry(s.clusterBits, s.extendedL2);
  const l1Size = l1EntriesFor(size, g);
  if (l1Size * 8 > MAX_L1_BYTES) throw new QcowError('QCOW_INVALID_ARGUMENT', "The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  const h = newHeader(s, size, options.backingFile, options.backingFile !== undefined ? options.backingFormat : undefined);
  if (s.dataFile !== undefined) {
    if (!options.openFile) throw new QcowError('QCOW_UNSUPPORTED', `cannot create data file '${s.dataFile}' (no file opener)`);
    const df = await options.openFile(s.dataFile, { readOnly: false, create: true });
    try {
      // As QEMU, which grows the data file with the image to the virtual size in every mode:
      // sparse (off, metadata), blocks reserved (falloc), or zeros written (full).
      await df.truncate(0);
      if (s.preallocation === 'full') await writeZeros(df, 0, size);
      else if (s.preallocation === 'falloc' && df.allocate && size > 0) await df.allocate(0, size);
      await df.truncate(size);
      await df.flush();
    } finally {
      await df.close();
    }
  }

  // Clusters 0..2: header, refcount table (one entry: the block at cluster 2), the block.
  await store.truncate(0);
  const table = new Uint8Array(cs);
  setU64(table, 0, 2 * cs);
  const block = new Uint8Array(cs);
  const l1 = new Uint8Array(l1Size * 8);
  const l1Clusters = Math.ceil(l1.length / cs);
  // The common image (no encryption, no preallocation, an L1 table that fits in the block's reach)
  // ends with the L1 table at cluster 3, the first free one: that block is written once with all
  // four counts, where the allocator would read the table and block back (two fresh cluster-sized
  // buffers and a Float64Array) and write the block again. The same bytes land either way.
  // Debug stores (blkdebug) take the allocator's path, whose events their rules may wait for.
  const direct = !s.encryption && !preallocates(s) && store.debugEvent === undefined && 3 + l1Clusters <= (cs * 8) / s.refcountBits;
  const counted = direct ? 3 + l1Clusters : 3;
  for (let i = 0; i < counted; i++) setRefcount(block, i, s.refcountBits, 1);
  await store.write(0, encodeHeader(h, cs));
  await store.write(cs, table);
  await store.write(2 * cs, block);
  if (direct) {
    if (l1Size > 0) {
      h.l1TableOffset = 3 * cs;
      h.l1Size = l1Size;
      await store.write(h.l1TableOffset, l1);
    }
    // The header last, as below: refcount table at cluster 1, one cluster long.
    h.refcountTableOffset = cs;
    h.refcountTableClusters = 1;
    await store.write(0, encodeHeader(h, cs));
    return;
  }
  const { Refcounts } = await import('./alloc.js');
  const rc = await Refcounts.load(store, { clusterSize: cs, refcountBits: s.refcountBits, tableOffset: cs, tableClusters: 1 });

  // The L1 table (qemu leaves its last cluster short at the end of the file).
  if (l1Size > 0) {
    h.l1TableOffset = await rc.allocClusters(l1Clusters);
    h.l1Size = l1Size;
  }

  if (s.encryption === 'luks') {
    // Loaded here only: the LUKS code is not needed to start the CLI or for plain images.
    const { createLuks } = await import('../../crypto/luks.js');
    const luks = await createLuks(options.password!, s.luks);
    const at = await rc.allocClusters(Math.ceil(luks.area.length / cs));
    await store.write(at, luks.area);
    h.fde = { offset: at, length: luks.area.length };
  }

  let dataEnd = 0;
  if (preallocates(s)) {
    dataEnd = await preallocate(store, rc, l1, g, s, size);
  }
  await rc.writeBack(async () => undefined);
  if (l1Size > 0) await store.write(h.l1TableOffset, l1);
  // Metadata is written; the header goes last so a failed create never looks like a valid image.
  h.refcountTableOffset = rc.tableOffset;
  h.refcountTableClusters = rc.tableClusters;
  await store.write(0, encodeHeader(h, cs));
  const end = Math.max(await store.size(), dataEnd);
  if (end > (await store.size())) await store.truncate(end);
}

/** Whether the image is made with L2 tables (and maybe data clusters) in place: see preallocate. */
const preallocates = (s: Qcow2CreateSettings): boolean =>
  s.preallocation === 'metadata' || s.preallocation === 'full' || s.preallocation === 'falloc' || s.dataFileRaw;

/**
 * Allocate every L2 table and data cluster as qemu does (table, then the clusters it maps). With
 * an external data file the data lives there at guest offset = host offset and needs no refcount.
 */
async function preallocate(
  store: ByteStore,
  rc: Refcounts,
  l1: Uint8Array,
  g: ReturnType<typeof qcow2Geometry>,
  s: Qcow2CreateSettings,
  size: number,
): Promise<number> {
  const cs = g.clusterSize;
  const clusters = Math.ceil(size / cs);
  const external = s.dataFile !== undefined;
  let end = 0;
  for (let i = 0; i * g.l2Entries < clusters; i++) {
    const n = Math.min(g.l2Entries, clusters - i * g.l2Entries);
    const l2Offset = await rc.allocClusters(1);
    const data = external ? i * g.l2Coverage : await rc.allocClusters(n);
    const l2 = new Uint8Array(cs);
    for (let j = 0; j < n; j++) setL2Entry(l2, j, g.l2EntryBytes, standardL2Entry(data + j * cs, { copied: true }));
    await store.write(l2Offset, l2);
    setL1Entry(l1, i, l2Offset, true);
    if (!external) {
      if (s.preallocation === 'full') await writeZeros(store, data, n * cs);
      // falloc: the data clusters' blocks reserved without writing them, where the store can.
      else if (s.preallocation === 'falloc' && store.allocate) await store.allocate(data, n * cs);
      end = Math.max(end, data + n * cs);
    }
  }
  return end;
}

async function writeZeros(store: ByteStore, offset: number, length: number): Promise<void> {
  const chunk = new Uint8Array(Math.min(length, 1 << 20));
  for (let done = 0; done < length; done += chunk.length) {
    const n = Math.min(chunk.length, length - done);
    await store.write(offset + done, chunk.subarray(0, n));
  }
}
