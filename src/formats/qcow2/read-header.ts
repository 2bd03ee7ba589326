/**
 * Reading a qcow2 header from a store: its first page (the whole first cluster only when the header
 * reaches past it; past the end of a short file, zeros), the decode (header.ts), and the checks every reader of an image makes before trusting it (unknown
 * incompatible features, encryption method, v2's fixed refcount width). The device's open, check
 * and the repair of a dirty image all start here, so they refuse the same images the same way.
 */
import { corrupt, unsupported } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import { decodeHeader, decodeHeaderPrefix, peekClusterBits, type Qcow2Header } from './header.js';
import { AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE, checkIncompatibleFeatures, hasFeature } from './features.js';

/** What readHeader reads first: one page, which holds the whole header of most images. */
const HEADER_PREFIX_BYTES = 4096;

export interface HeaderRead {
  header: Qcow2Header;
  /** The store's length when the header was read. */
  fileSize: number;
}

export async function readHeader(store: ByteStore): Promise<HeaderRead> {
  const fileSize = await store.size();
  // Header extensions run to the end of the first cluster, up to 2 MiB; they seldom take more
  // than the first few hundred bytes. So the first page is read, with the cluster size in it, and
  // the rest of the cluster only when the header reaches past that page.
  const head = new Uint8Array(Math.min(HEADER_PREFIX_BYTES, fileSize));
  await store.read(0, head);
  // The header area is the whole first cluster even in a file that ends inside it, and what lies
  // past the end reads as zeros: QEMU bounds the extensions by the cluster (qcow2_read_extensions),
  // and its reads past the end of a file return zeros. A truncated image whose extensions were
  // cut short so opens, and its check reports what the lost clusters leave, as qemu-img's does.
  const area = 2 ** peekClusterBits(head);
  let header = decodeHeaderPrefix(head, area);
  if (!header) {
    const first = new Uint8Array(area);
    await store.read(0, first.subarray(0, Math.min(area, fileSize)));
    header = decodeHeader(first);
  }
  checkIncompatibleFeatures(header);
  if (header.cryptMethod > 2) throw unsupported(`qcow2 header: unknown encryption method ${header.cryptMethod}`);
  if (header.version === 2 && header.refcountOrder !== 4) throw corrupt('qcow2 v2 header: refcount_order must be 4');
  // "The data file is raw" says nothing without a data file; QEMU refuses to open such an image.
  if (hasFeature(header.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW) && !hasFeature(header.incompatibleFeatures, INCOMPAT_DATA_FILE)) throw corrupt('data-file-raw requires a data file');
  return { header, fileSize };
}
