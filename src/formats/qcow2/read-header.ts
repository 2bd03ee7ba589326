/**
 * Reading a qcow2 header from a store: the probe for the cluster size, the first cluster, the
 * decode (header.ts), and the checks every reader of an image makes before trusting it (unknown
 * incompatible features, encryption method, v2's fixed refcount width). The device's open, check
 * and the repair of a dirty image all start here, so they refuse the same images the same way.
 */
import { corrupt, unsupported } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import { HEADER_PROBE_BYTES, decodeHeader, peekClusterBits, type Qcow2Header } from './header.js';
import { AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE, checkIncompatibleFeatures, hasFeature } from './features.js';

export interface HeaderRead {
  header: Qcow2Header;
  /** The store's length when the header was read. */
  fileSize: number;
}

export async function readHeader(store: ByteStore): Promise<HeaderRead> {
  const fileSize = await store.size();
  const head = new Uint8Array(Math.min(HEADER_PROBE_BYTES, fileSize));
  await store.read(0, head);
  // Header extensions run to the end of the first cluster: its size comes first.
  const clusterBits = peekClusterBits(head);
  const first = new Uint8Array(Math.min(2 ** clusterBits, fileSize));
  await store.read(0, first);
  const header = decodeHeader(first);
  checkIncompatibleFeatures(header);
  if (header.cryptMethod > 2) throw unsupported(`qcow2 header: unknown encryption method ${header.cryptMethod}`);
  if (header.version === 2 && header.refcountOrder !== 4) throw corrupt('qcow2 v2 header: refcount_order must be 4');
  // "The data file is raw" says nothing without a data file; QEMU refuses to open such an image.
  if (hasFeature(header.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW) && !hasFeature(header.incompatibleFeatures, INCOMPAT_DATA_FILE)) throw corrupt('data-file-raw requires a data file');
  return { header, fileSize };
}
