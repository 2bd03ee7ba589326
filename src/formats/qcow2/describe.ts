/**
 * What `qemu-img info` shows for a qcow2 image: the generic fields and the "format-specific" object
 * with qemu's keys in qemu's order (compat, compression-type, lazy-refcounts, bitmaps,
 * refcount-bits, data-file, data-file-raw, encrypt, corrupt, extended-l2; v2 stops after
 * refcount-bits and encrypt).
 */
import type { ImageDescription, SnapshotInfo } from '../../core/block-device.js';
import { COMPRESSION_ZSTD } from './header.js';
import { AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, hasFeature } from './features.js';
import type { Qcow2Image } from './image.js';
import type { PersistentBitmaps } from './bitmaps/persistent.js';

/** `bitmaps`: the image's persistent bitmaps (the device knows whether its writer holds them). */
export async function describeQcow2(dev: Qcow2Image, bitmaps: () => Promise<PersistentBitmaps>): Promise<ImageDescription> {
  const h = dev.header;
  const data: Record<string, unknown> = {
    compat: h.version === 2 ? '0.10' : '1.1',
    'compression-type': h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib',
  };
  if (h.version === 3) {
    data['lazy-refcounts'] = hasFeature(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS);
    // qemu ignores the bitmaps extension unless the autoclear bit says it is still valid.
    if (h.bitmaps && hasFeature(h.autoclearFeatures, AUTOCLEAR_BITMAPS)) {
      const list = (await bitmaps()).list();
      if (list.length) {
        data.bitmaps = list.map((b) => ({
          flags: [...(b.inUse ? ['in-use'] : []), ...(b.auto ? ['auto'] : [])],
          name: b.name,
          granularity: b.granularity,
        }));
      }
    }
  }
  data['refcount-bits'] = 2 ** h.refcountOrder;
  // A header may lack the name (it is then given at open): the rest is still the image's.
  if (hasFeature(h.incompatibleFeatures, INCOMPAT_DATA_FILE)) {
    if (h.dataFile !== undefined) data['data-file'] = h.dataFile;
    data['data-file-raw'] = dev.dataFileRaw;
  }
  if (dev.encryption) data.encrypt = dev.encryption.info;
  if (h.version === 3) {
    data.corrupt = hasFeature(h.incompatibleFeatures, INCOMPAT_CORRUPT);
    data['extended-l2'] = dev.geometry.extendedL2;
  }
  const d: ImageDescription = {
    format: 'qcow2',
    virtualSize: dev.size,
    clusterSize: dev.clusterSize,
    dirty: dev.dirty,
    formatSpecific: { type: 'qcow2', data },
  };
  if (h.cryptMethod !== 0) d.encrypted = true;
  if (h.backingFile !== undefined) d.backingFilename = h.backingFile;
  if (h.backingFormat !== undefined) d.backingFormat = h.backingFormat;
  if (dev.snapshots.length) d.snapshots = dev.snapshots.map(snapshotInfo);
  return d;
}

function snapshotInfo(s: { id: string; name: string; vmStateSize: number; dateSec: number; dateNsec: number; vmClockNsec: number; icount?: bigint; diskSize?: number }): SnapshotInfo {
  const out: SnapshotInfo = { id: s.id, name: s.name, vmStateSize: s.vmStateSize, dateSec: s.dateSec, dateNsec: s.dateNsec, vmClockNsec: s.vmClockNsec };
  // qemu prints icount unless it is "disabled" (all ones).
  if (s.icount !== undefined && s.icount !== 0xffffffffffffffffn) out.icount = Number(s.icount);
  if (s.diskSize !== undefined) out.diskSize = s.diskSize;
  return out;
}
