/**
 * `amend` for qcow2, as qemu-img amend does it: change what can change in place.
 *   - compat=0.10|1.1 (v2|v3): upgrading rewrites the header; downgrading first turns v3 zero
 *     clusters into what v2 can express (ZERO_ALLOC -> a normal cluster holding zeros;
 *     ZERO_PLAIN -> unallocated without a backing file, a fresh zero cluster with one), then
 *     writes the v2 header. Refused as qemu refuses: extended L2 (or any other incompatible
 *     feature), an external data file, refcount_bits != 16, lazy_refcounts=on, zstd with
 *     compressed clusters. Persistent bitmaps do not stop it (qemu 7.2 does not refuse either):
 *     v2 cannot hold them, so they are removed first.
 *   - lazy_refcounts=on|off (v3 only).
 *   - refcount_bits=N: new refcount blocks and table are allocated as qemu-img allocates them
 *     (first fit, through the old structures, in its passes; the same bytes result), written and
 *     flushed, and only then does the header name them (with the new refcount_order); the old
 *     structures become free space.
 *   - size=SIZE: resize (shrinking allowed, as qemu-img amend allows it).
 *   - backing_file / backing_fmt: only their current values (qemu 7.2 says "Cannot amend the
 *     backing file"; qemu-img rebase changes them).
 *   - data_file=NAME (images with an external data file only): the name the header records; an
 *     empty name drops it, and the image then needs its data file named when opened (as qemu 7.2
 *     leaves it). The file itself is not opened nor checked, as qemu does not.
 *   - data_file_raw=off clears the raw-external-data bit; =on only where it is already set (qemu:
 *     "data-file-raw cannot be set on existing images").
 *   - a downgrade with internal snapshots is refused when one of them has another disk size than
 *     the image (after any size=) or a VM state past 32 bits, as qemu refuses it: v2 programs
 *     would not know that the snapshot's size matters.
 * Every other option is refused with qemu's wording.
 *
 * Crash safety: each step leaves a valid image of the old or the new kind. Zero clusters are
 * expanded by writing data first, then refcounts (flushed), then the L2 tables (flushed), then the
 * old references are dropped; the v2 header is written last. A kill leaves leaks at most.
 *
 * Differs from qemu 7.2 on purpose: qemu's downgrade writes zeros into a ZERO_ALLOC cluster even
 * when an internal snapshot shares it (checked: the snapshot then reads zeros and `qemu-img check`
 * reports OFLAG_COPIED errors). Here a shared cluster is never overwritten: the entry gets a fresh
 * cluster (or none, without a backing file).
 *
 * And with persistent bitmaps: qemu 7.2's downgrade only clears the autoclear bit, so the v2 image
 * keeps a bitmaps extension that every later open warns about, and `qemu-img check` reports the
 * bitmaps' clusters as leaked. Here they are removed (clusters freed, extension dropped) before the
 * downgrade: the same bitmaps are lost, and the image checks clean.
 */
import { CorruptionEvent, QcowError, altHex, invalidArgument, unsupported } from '../../core/errors.js';
import { parseSize } from '../../core/size.js';
import { COMPRESSION_ZLIB, V3_HEADER_LENGTH, qemuFeatureNames } from './header.js';
import { AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, hasFeature } from './features.js';
import { Refcounts } from './alloc.js';
import { checkRefcountBits, encodeRefcountTable, entriesPerBlock, maxRefcount, setRefcount } from './refcount.js';
import { L2_ZERO, readL2Entry, standardL2Entry } from './l2-entry.js';
import { L2_COMPRESSED } from './compressed-descriptor.js';
import { l1TableOffset } from './l1-entry.js';
import { checkSnapshotL1, readSnapshotTable, V3_MIN_EXTRA } from './snapshot-table.js';
import { rewriteSnapshotTable, type SnapshotDevice } from './snapshot-write.js';
import type { Qcow2Header } from './header.js';
import type { Qcow2Encryption } from './encryption.js';
import type { Qcow2Snapshot } from './snapshot-table.js';
import type { Qcow2DeviceParts } from './device-parts.js';
import type { Qcow2Writer } from './write.js';
import type { AmendContext, AmendProgressCallback } from '../../core/block-device.js';
import { luksSlotChangeOf } from '../../crypto/luks-amend.js';
import { MAX_REFCOUNT_TABLE_BYTES } from './layout.js';

/**
 * What amend needs of the device. The device loads this module when an amend runs, so this module
 * names the parts it uses rather than importing the device back (which would be an import cycle).
 */
export interface AmendDevice extends Qcow2DeviceParts, SnapshotDevice {
  readonly header: Readonly<Qcow2Header>;
  readonly fileSize: number;
  readonly encryption: Qcow2Encryption | null;
  readonly openedSnapshot: Qcow2Snapshot | undefined;
  resize(size: number, options: { shrink?: boolean }): Promise<void>;
}

/** Options qemu-img only takes when creating an image. */
const CREATE_ONLY = new Set([
  'cluster_size',
  'preallocation',
  'compression_type',
  'extended_l2',
  'encryption',
  'encrypt.format',
  'encrypt.key-secret',
  'encrypt.cipher-alg',
  'encrypt.cipher-mode',
  'encrypt.ivgen-alg',
  'encrypt.ivgen-hash-alg',
  'encrypt.hash-alg',
]);

export interface AmendPlan {
  version?: 2 | 3;
  lazyRefcounts?: boolean;
  refcountBits?: number;
  size?: number;
  /** The external data file name the header is to record; null: none. */
  dataFile?: string | null;
  /** Whether the raw-external-data bit is to be set (only ever kept set or cleared). */
  dataFileRaw?: boolean;
}

/** Validate `options` against the image's header; nothing is written. */
export function planAmend(dev: AmendDevice, options: Record<string, string>): AmendPlan {
  const h = dev.header;
  const plan: AmendPlan = {};
  if (Object.keys(options).length === 0) throw invalidArgument('Must specify options (-o)');
  for (const [k, v] of Object.entries(options)) {
    switch (k) {
      case 'compat':
        if (v === '0.10' || v === 'v2') plan.version = 2;
        else if (v === '1.1' || v === 'v3') plan.version = 3;
        else throw invalidArgument(`Unknown compatibility level ${v}`);
        break;
      case 'lazy_refcounts':
        if (v !== 'on' && v !== 'off') throw invalidArgument("Parameter 'lazy_refcounts' expects 'on' or 'off'");
        plan.lazyRefcounts = v === 'on';
        break;
      case 'refcount_bits': {
        const n = /^\d+$/.test(v) ? Number(v) : NaN;
        checkRefcountBits(n);
        plan.refcountBits = n;
        break;
      }
      case 'size':
        plan.size = parseSize(v);
        break;
      case 'backing_file':
      case 'backing_fmt':
        break;
      case 'data_file':
        if (!hasFeature(h.incompatibleFeatures, INCOMPAT_DATA_FILE)) throw invalidArgument('data-file can only be set for images that use an external data file');
        plan.dataFile = v === '' ? null : v;
        break;
      case 'data_file_raw':
        if (v !== 'on' && v !== 'off') throw invalidArgument("Parameter 'data_file_raw' expects 'on' or 'off'");
        if (v === 'on' && !hasFeature(h.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW)) throw invalidArgument('data-file-raw cannot be set on existing images');
        plan.dataFileRaw = v === 'on';
        break;
      case 'encrypt.iter-time':
      case 'encrypt.keyslot':
      case 'encrypt.new-secret':
      case 'encrypt.old-secret':
      case 'encrypt.state':
        // LUKS key slots (crypto/luks-amend.ts, applied by amendQcow2).
        if (dev.encryption?.changeSlots) break;
        throw unsupported(`Amending '${k}' is not supported`);
      default:
        if (CREATE_ONLY.has(k)) throw invalidArgument(`Invalid parameter '${k}': this option is only supported for image creation`);
        throw invalidArgument(`Invalid parameter '${k}'`);
    }
  }
  if ('backing_file' in options || 'backing_fmt' in options) {
    if (options.backing_file !== h.backingFile || options.backing_fmt !== h.backingFormat) {
      throw unsupported("Cannot amend the backing file. You can use 'qemu-img rebase' instead.");
    }
  }
  const finalVersion = plan.version ?? h.version;
  const lazyNow = hasFeature(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS);
  if (finalVersion === 2) {
    if (plan.lazyRefcounts === true || (lazyNow && plan.version === undefined)) {
      throw invalidArgument('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
    }
    if (plan.refcountBits !== undefined && plan.refcountBits !== 16) {
      throw invalidArgument('Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
    }
  }
  if (plan.version === 2 && h.version === 3) {
    if (hasFeature(h.incompatibleFeatures, INCOMPAT_DATA_FILE)) throw unsupported('Cannot downgrade an image with a data file');
    const other = h.incompatibleFeatures & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
    if (other !== 0n) throw unsupported(`Cannot downgrade an image with incompatible features 0x${other.toString(16)} set`);
    if ((plan.refcountBits ?? 2 ** h.refcountOrder) !== 16) throw unsupported('compat=0.10 requires refcount_bits=16');
    // A downgrade turns lazy refcounts off unless they were asked for (refused above).
    plan.lazyRefcounts = false;
  }
  if (dev.openedSnapshot) throw unsupported('cannot amend a snapshot');
  return plan;
}

/** The operations of an amend, as AmendSteps tells them apart. */
const STEP_UPGRADE = 1;
const STEP_REFCOUNT_WIDTH = 2;
const STEP_DOWNGRADE = 3;

/** Without a way to look secrets up, every secret id is unknown (QEMU's words). */
const noSecrets = (id: string): never => {
  throw invalidArgument(`No secret with id '${id}'`);
};

/** Apply `options` to an image opened read-write; `progress` as qemu-img amend -p counts the work. */
export async function amendQcow2(dev: AmendDevice, options: Record<string, string>, progress?: AmendProgressCallback, context: AmendContext = {}): Promise<void> {
  const plan = planAmend(dev, options);
  const slots = luksSlotChangeOf(options, 'encrypt.', context.secret ?? noSecrets, !!context.force);
  if (slots) await dev.encryption!.changeSlots!(slots);
  const h0 = dev.image.header;
  const changesWidth = plan.refcountBits !== undefined && plan.refcountBits !== 2 ** h0.refcountOrder;
  // The operations qemu-img counts for -p: a version change and a refcount width change.
  const steps = new AmendSteps(Number(plan.version !== undefined && plan.version !== h0.version) + Number(changesWidth), progress);
  const w = dev.requireWriter();
  const image = dev.image;
  const h = image.header;
  await w.exclusive(async () => {
    if (plan.version === 3 && h.version === 2) {
      // Version 3 requires every snapshot entry to carry its 64-bit VM state size and disk size,
      // which version 2 entries may lack: the table is written in full before the header says 3.
      // Progress in two halves, as qemu-img counts an upgrade: the snapshot table, the header.
      steps.report(STEP_UPGRADE, 0, 2);
      if (dev.snapshots.some((s) => s.storedExtraSize !== undefined && s.storedExtraSize < V3_MIN_EXTRA)) await rewriteSnapshotTable(dev, w);
      steps.report(STEP_UPGRADE, 1, 2);
      await image.writeHeader((hh) => {
        hh.version = 3;
        hh.headerLength = V3_HEADER_LENGTH;
        hh.featureNames = qemuFeatureNames(3, hh.clusterBits);
      });
      await image.store.flush();
      steps.report(STEP_UPGRADE, 2, 2);
    }
    if (changesWidth) await changeRefcountWidth(dev, w, plan.refcountBits!, (done, work) => steps.report(STEP_REFCOUNT_WIDTH, done, work));
    const raw = plan.dataFileRaw !== undefined && plan.dataFileRaw !== hasFeature(h.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
    if (raw || (plan.dataFile !== undefined && (plan.dataFile ?? undefined) !== h.dataFile)) {
      const { dataFile, dataFileRaw } = plan;
      await image.writeHeader((hh) => {
        if (raw) hh.autoclearFeatures = dataFileRaw ? hh.autoclearFeatures | AUTOCLEAR_DATA_FILE_RAW : hh.autoclearFeatures & ~AUTOCLEAR_DATA_FILE_RAW;
        if (dataFile !== undefined) hh.dataFile = dataFile ?? undefined;
      });
      await image.store.flush();
    }
    if (plan.lazyRefcounts !== undefined && plan.lazyRefcounts !== hasFeature(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS)) {
      // Refcounts were written back by exclusive(): turning lazy refcounts off needs no repair.
      const lazy = plan.lazyRefcounts;
      await image.writeHeader((hh) => {
        if (lazy) hh.compatibleFeatures |= COMPAT_LAZY_REFCOUNTS;
        else {
          hh.compatibleFeatures &= ~COMPAT_LAZY_REFCOUNTS;
          hh.incompatibleFeatures &= ~INCOMPAT_DIRTY;
        }
      });
      await image.store.flush();
    }
  });
  if (plan.size !== undefined && plan.size !== dev.size) await dev.resize(plan.size, { shrink: true });
  if (plan.version === 2 && h.version === 3) {
    await w.exclusive(async () => {
      await downgrade(dev, w, (done, work) => steps.report(STEP_DOWNGRADE, done, work));
    });
  }
}

/**
 * A corrupt table met while zero clusters are expanded: a corruption event (`why`, QEMU's words),
 * which marks the image corrupt, and the downgrade's error (QEMU's "Failed to turn zero into data
 * clusters" with EIO).
 */
async function expansionFailed(w: Qcow2Writer, why: string): Promise<QcowError> {
  const event = new CorruptionEvent(why);
  await w.markCorrupt(event);
  return new QcowError('QCOW_CORRUPT', `cannot expand zero clusters: ${why}`, { errno: 'EIO', cause: event });
}

/** The v3 -> v2 step: zero clusters expanded (all L1 tables), then the v2 header. */
async function downgrade(dev: AmendDevice, w: Qcow2Writer, report: (done: number, work: number) => void): Promise<void> {
  const h = dev.header;
  const cs = dev.clusterSize;
  const g = dev.geometry;
  const rc = w.refcounts;
  const hasBacking = h.backingFile !== undefined;
  const snaps = h.nbSnapshots > 0 ? await readSnapshotTable(dev.store, h.nbSnapshots, h.snapshotsOffset, dev.fileSize, dev.size) : [];
  // v2 entries may lack the disk size, and v2 programs take the image's: only snapshots of the
  // image's size, with a VM state size that fits v2's 32 bits, keep their meaning.
  if (snaps.some((s) => s.vmStateSize > 0xffffffff || (s.diskSize ?? dev.size) !== dev.size)) throw unsupported('Internal snapshots prevent downgrade of image');
  const l1s: Uint8Array[] = [dev.l1.slice(0, dev.l1Entries * 8)];
  for (const s of snaps) {
    try {
      checkSnapshotL1(s, cs);
    } catch (e) {
      if (e instanceof QcowError) e.message = `cannot expand zero clusters: ${e.message}`;
      throw e;
    }
    const b = new Uint8Array(s.l1Size * 8);
    if (b.length) await dev.store.read(s.l1TableOffset, b);
    l1s.push(b);
  }
  const zstd = h.compressionType !== COMPRESSION_ZLIB;
  const seen = new Set<number>();
  const changed: Array<[number, Uint8Array]> = [];
  // Progress in L1 entries visited, over every L1 table, told after each (as qemu-img counts a
  // downgrade's work).
  const l1Entries = l1s.reduce((n, l1) => n + l1.length / 8, 0);
  let visited = 0;
  for (const l1 of l1s) {
    for (let i = 0; i < l1.length / 8; i++, report(++visited, l1Entries)) {
      const off = l1TableOffset(l1, i);
      if (off === 0 || seen.has(off)) continue;
      if (off % cs !== 0) throw await expansionFailed(w, `L2 table offset 0x${off.toString(16)} unaligned (L1 index: ${altHex(i)})`);
      seen.add(off);
      const table = new Uint8Array(cs);
      await dev.store.read(off, table);
      const tv = new DataView(table.buffer);
      // Every path to this table is a reference to each cluster it names.
      const paths = await rc.get(off / cs);
      let dirty = false;
      for (let j = 0; j < g.l2Entries; j++) {
        const e = tv.getBigUint64(j * 8);
        if (e & L2_COMPRESSED) {
          if (zstd) throw unsupported('Cannot downgrade an image with zstd compression type and existing compressed clusters');
          continue;
        }
        if ((e & L2_ZERO) === 0n) continue;
        const d = readL2Entry(table, j, dev.l2Context, true);
        if (d.kind === 'zero-alloc' && d.hostOffset % cs !== 0) {
          throw await expansionFailed(w, `Cluster allocation offset 0x${d.hostOffset.toString(16)} unaligned (L2 offset: ${altHex(off)}, L2 index: ${altHex(j)})`);
        }
        const guest = i * g.l2Coverage + j * cs;
        let next: bigint;
        if (d.kind === 'zero-alloc' && (await rc.get(d.hostOffset / cs)) === paths) {
          // Only this table reaches the cluster: zeros in place, same entry without the flag.
          await writeZeros(dev, guest, d.hostOffset);
          next = e & ~L2_ZERO;
        } else {
          if (d.kind === 'zero-alloc') for (let p = 0; p < paths; p++) rc.free(d.hostOffset, cs);
          if (!hasBacking) next = 0n;
          else {
            const at = await rc.allocClusters(1);
            if (paths > 1) await rc.update(at, cs, paths - 1);
            await writeZeros(dev, guest, at);
            next = standardL2Entry(at, { copied: paths === 1 });
          }
        }
        tv.setBigUint64(j * 8, next);
        dirty = true;
      }
      if (dirty) changed.push([off, table]);
    }
  }
  // Nothing can refuse the downgrade past the scan above: drop the bitmaps v2 cannot hold (their
  // clusters are freed with the old references, by flushLocked). A crash after this leaves a v3
  // image without bitmaps, which the downgrade was going to lose anyway.
  await w.bitmaps.removeAll();
  // Zeros are written; counts for new clusters next, then the tables, then old references drop.
  await w.writeRefcounts();
  await dev.store.flush();
  for (const [off, table] of changed) await dev.store.write(off, table);
  await dev.store.flush();
  dev.map.l2Cache.clear();
  await dev.map.reloadL1();
  await w.flushLocked();

  await dev.image.writeHeader((hh) => {
    hh.version = 2;
    hh.compressionType = COMPRESSION_ZLIB;
    hh.incompatibleFeatures = 0n;
    hh.compatibleFeatures = 0n;
    hh.autoclearFeatures = 0n;
    hh.featureNames = [];
    hh.headerLength = 72;
  });
  await dev.store.flush();
}

async function writeZeros(dev: AmendDevice, guest: number, host: number): Promise<void> {
  const zeros = new Uint8Array(dev.clusterSize);
  const enc = dev.encryption;
  if (!enc) {
    await dev.store.write(host, zeros);
    return;
  }
  await dev.store.write(host, await enc.cipher().encrypt(zeros, (enc.ivFromHostSector ? host : guest) / 512));
}

/**
 * Progress of an amend made of several operations (a version change, a refcount width change),
 * as qemu-img amend -p draws it: each operation reports (done, work) of its own; the whole is the
 * work of the operations finished so far plus the current one, and the operations still to come
 * are estimated at the average size of those seen.
 */
class AmendSteps {
  private finishedWork = 0;
  private finishedOps = 0;
  private current = -1;
  private lastWork = 0;
  constructor(
    private readonly total: number,
    private readonly progress: AmendProgressCallback | undefined,
  ) {}

  /** Operation `op` (one number per operation) has done `done` of its `work`. */
  report(op: number, done: number, work: number): void {
    if (!this.progress || this.total === 0) return;
    if (op !== this.current) {
      if (this.current !== -1) {
        this.finishedWork += this.lastWork;
        this.finishedOps++;
      }
      this.current = op;
    }
    this.lastWork = work;
    const known = this.finishedWork + work;
    const rest = Math.floor((known * (this.total - this.finishedOps - 1)) / (this.finishedOps + 1));
    this.progress(this.finishedWork + done, known + rest);
  }
}

/**
 * New refcount structures of `bits`-wide entries, made as QEMU makes them (its walks over the
 * refcount table, so the new blocks and table land where qemu-img puts them and -p reports the
 * same passes): walks over the old counts allocate a new block, through the old structures, for
 * every range of `bits`-wide counts that is not all zero, then a new table for them, until a walk
 * allocates nothing (each allocation may make another range non-empty); a last walk writes the
 * blocks with the counts as they are then, new structures included. The header names the new
 * table only once all of it is on disk; the old blocks and table are then freed in the new counts.
 * A crash before the header write leaks the new structures; after it, the old ones.
 */
async function changeRefcountWidth(dev: AmendDevice, w: Qcow2Writer, bits: number, report: (done: number, work: number) => void): Promise<void> {
  const cs = dev.clusterSize;
  const rc = w.refcounts as Refcounts;
  const oldPer = rc.perBlock;
  const newPer = entriesPerBlock(cs, bits);
  const perTableCluster = cs / 8;
  const count = async (c: number) => rc.peek(c) ?? (await rc.get(c));
  // Every count must fit the new width (allocations below only add counts of 1, which always fit).
  const max = maxRefcount(bits);
  for (let t = 0; t < rc.blockOffsets().length; t++) {
    if (rc.blockOffsets()[t] === 0) continue;
    for (let c = t * oldPer; c < (t + 1) * oldPer; c++) {
      const v = await count(c);
      if (v > max) throw invalidArgument(`Cannot decrease refcount entry width to ${bits} bits: Cluster at offset 0x${(c * cs).toString(16)} has a refcount of ${v}`);
    }
  }
  /** New block offsets by index (0: none); the new table holds `tableEntries` (whole clusters). */
  const newTable: number[] = [];
  let tableEntries = 0;
  let tableAt = 0;
  let tableAllocated = 0;

  /**
   * One walk over the old table (its length read as the walk goes: allocations may grow it),
   * feeding every cluster's count into the new blocks in order. Without `write`, a finished block
   * that is not empty gets a cluster if it has none (returns whether any did); with it, blocks
   * with a cluster are written there.
   */
  const walk = async (index: number, total: number, write: boolean): Promise<boolean> => {
    let allocated = false;
    let j = 0;
    let fill = 0;
    let empty = true;
    const block = write ? new Uint8Array(cs) : null;
    const grow = (last: number) => {
      if (last < tableEntries) return;
      tableEntries = Math.ceil((last + 1) / perTableCluster) * perTableCluster;
      if (tableEntries * 8 > MAX_REFCOUNT_TABLE_BYTES) throw unsupported('This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting');
    };
    const finish = async () => {
      if (!write) {
        // The table grows to name non-empty blocks only.
        if (!empty) grow(j);
        if (!empty && !newTable[j]) {
          newTable[j] = await rc.allocClusters(1, 'refcount block');
          allocated = true;
        }
      } else if (newTable[j]) await dev.store.write(newTable[j]!, block!);
      j++;
      fill = 0;
      empty = true;
      block?.fill(0);
    };
    /** `n` clusters of count 0 (an old table entry without a block): whole new blocks at once. */
    const zeros = async (n: number) => {
      while (n > 0) {
        if (fill === 0 && n >= newPer) {
          const k = Math.floor(n / newPer);
          // A block given a cluster in an earlier walk may have become empty since: written as zeros.
          if (write) for (let x = j; x < j + k; x++) if (newTable[x]) await dev.store.write(newTable[x]!, new Uint8Array(cs));
          j += k;
          n -= k * newPer;
          continue;
        }
        const take = Math.min(n, newPer - fill);
        fill += take;
        n -= take;
        if (fill === newPer) await finish();
      }
    };
    for (let t = 0; t < rc.blockOffsets().length; t++) {
      const n = rc.blockOffsets().length;
      report(index * n + t, total * n);
      if (rc.blockOffsets()[t] === 0) {
        await zeros(oldPer);
        continue;
      }
      for (let c = t * oldPer; c < (t + 1) * oldPer; c++) {
        const v = await count(c);
        if (v !== 0) {
          empty = false;
          if (block) setRefcount(block, fill, bits, v);
        }
        if (++fill === newPer) await finish();
      }
    }
    if (fill > 0) await finish();
    const n = rc.blockOffsets().length;
    report((index + 1) * n, total * n);
    return allocated;
  };

  let index = 0;
  for (;;) {
    // This walk, the one that writes, and (normally) one more that finds nothing to allocate.
    const allocated = await walk(index, Math.max(index + 2, 3), false);
    index++;
    if (!allocated) break;
    if (tableAt !== 0) await rc.update(tableAt, tableAllocated * 8, -1);
    tableAt = await rc.allocClusters(Math.ceil((tableEntries * 8) / cs));
    tableAllocated = tableEntries;
  }
  await walk(index, index + 1, true);
  const table = new Uint8Array(tableEntries * 8);
  encodeRefcountTable(Array.from({ length: tableEntries }, (_, b) => newTable[b] ?? 0), table);
  await dev.store.write(tableAt, table);
  // The old structures' counts of the new ones, then the new ones themselves, are on disk first.
  await w.writeRefcounts();
  await dev.store.flush();
  const old = { tableOffset: rc.tableOffset, tableClusters: rc.tableClusters, blocks: Array.from(rc.blockOffsets()).filter((b) => b !== 0) };
  await dev.image.writeHeader((h) => {
    h.refcountOrder = Math.log2(bits);
    h.refcountTableOffset = tableAt;
    h.refcountTableClusters = tableEntries / perTableCluster;
  });
  await dev.store.flush();
  dev.image.setFileSize(Math.max(dev.image.fileSize, await dev.store.size()));
  const next = await Refcounts.load(dev.store, { clusterSize: cs, refcountBits: bits, tableOffset: tableAt, tableClusters: tableEntries / perTableCluster });
  dev.map.replaceRefcounts(next);
  for (const b of old.blocks) await next.update(b, cs, -1);
  await next.update(old.tableOffset, old.tableClusters * cs, -1);
  await w.writeRefcounts();
}
