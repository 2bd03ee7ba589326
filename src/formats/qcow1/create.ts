/**
 * Creating an empty qcow v1 image the way `qemu-img create -f qcow` lays it out:
 *   0    48-byte header
 *   48   backing file name (no NUL), if any
 *   H    L1 table, H = (48 + name length) rounded up to 8; then zeros to a whole 512-byte sector.
 * qcow has no cluster_size option: QEMU picks 4 KiB clusters with 512-entry L2 tables, or, with a
 * backing file, 512-byte clusters with 4096-entry tables (so that its writes, which never copy
 * from the backing file, always fill whole clusters).
 */
import type { CreateOptions } from '../../core/block-device.js';
import { QcowError, invalidArgument } from '../../core/errors.js';
import { alignUp, encodeUtf8 } from '../../core/bytes.js';
import type { ByteStore } from '../../storage/types.js';
import { CRYPT_AES, CRYPT_NONE, HEADER_SIZE, MAX_BACKING_NAME, MAX_L1_SIZE, encodeHeader, l1SizeOf, type QcowHeader } from './header.js';

export const CREATE_OPTIONS: Record<string, string> = {
  encryption: 'Encrypt the image with the legacy AES-CBC scheme (on/off; deprecated spelling of encrypt.format=aes)',
  'encrypt.format': "Encryption format: 'aes' (legacy AES-128-CBC; the password comes from --password-file)",
};

export interface Qcow1Geometry {
  clusterBits: number;
  l2Bits: number;
}

/** The geometry qemu-img chooses: it depends only on whether there is a backing file. */
export function geometryFor(hasBacking: boolean): Qcow1Geometry {
  return hasBacking ? { clusterBits: 9, l2Bits: 12 } : { clusterBits: 12, l2Bits: 9 };
}

/** Whether the -o options ask for encryption; rejects options qcow does not have. */
export function parseCreateOptions(options: Record<string, string> = {}): { encrypted: boolean } {
  let encrypted = false;
  for (const [key, value] of Object.entries(options)) {
    switch (key) {
      case 'encryption':
        if (value === 'on' || value === 'true') encrypted = true;
        else if (value !== 'off' && value !== 'false') throw invalidArgument(`Invalid value '${value}' for option 'encryption' (expected on or off)`);
        break;
      case 'encrypt.format':
        if (value === 'aes') encrypted = true;
        else throw invalidArgument(`Invalid value '${value}' for option 'encrypt.format': qcow only supports 'aes'`);
        break;
      case 'encrypt.key-secret':
        throw invalidArgument("Invalid parameter 'encrypt.key-secret': give the password with --password-file (or the password option of the library)");
      default:
        throw invalidArgument(`Invalid parameter '${key}' for format qcow (qcow accepts: ${Object.keys(CREATE_OPTIONS).join(', ')})`);
    }
  }
  return { encrypted };
}

export async function createQcow1(store: ByteStore, options: CreateOptions): Promise<void> {
  const { encrypted } = parseCreateOptions(options.options);
  if (encrypted && (options.password === undefined || options.password === '')) {
    throw new QcowError('QCOW_NEED_PASSWORD', 'an encrypted image needs a password (--password-file FILE)');
  }
  if (!Number.isSafeInteger(options.size) || options.size < 0) throw invalidArgument(`invalid image size ${options.size}`);
  // QEMU keeps sizes in 512-byte sectors and rounds a requested size up.
  const size = alignUp(options.size, 512);
  if (size < 2) throw invalidArgument('Image size is too small (must be at least 2 bytes)');

  const name = options.backingFile ? encodeUtf8(options.backingFile) : new Uint8Array(0);
  if (name.length > MAX_BACKING_NAME) throw invalidArgument(`backing file name too long (${name.length} bytes; qcow stores at most ${MAX_BACKING_NAME})`);
  const geometry = geometryFor(name.length > 0);
  const l1Size = l1SizeOf({ size, ...geometry });
  // qemu-img would write such an image, then refuse to open it.
  if (l1Size > MAX_L1_SIZE) throw invalidArgument(`Image too large: at most ${MAX_L1_SIZE * 2 ** (geometry.clusterBits + geometry.l2Bits)} bytes for qcow`);

  await writeEmptyImage(store, { size, ...geometry, backingName: name, encrypted });
}

export interface EmptyImageLayout extends Qcow1Geometry {
  /** Bytes, a multiple of 512 (QEMU rounds the header's size down to one). */
  size: number;
  backingName?: Uint8Array;
  encrypted?: boolean;
}

/**
 * Write an image with no data: header, name, zeroed L1 table. Any geometry QEMU opens is allowed
 * (cluster_bits 9..16, l2_bits 6..13); qemu-img itself only makes the two of geometryFor().
 */
export async function writeEmptyImage(store: ByteStore, layout: EmptyImageLayout): Promise<void> {
  const name = layout.backingName ?? new Uint8Array(0);
  const l1Size = l1SizeOf(layout);
  const l1TableOffset = alignUp(HEADER_SIZE + name.length, 8);
  const header: QcowHeader = {
    backingFileOffset: name.length > 0 ? HEADER_SIZE : 0,
    backingFileSize: name.length,
    mtime: 0,
    size: layout.size,
    clusterBits: layout.clusterBits,
    l2Bits: layout.l2Bits,
    cryptMethod: layout.encrypted ? CRYPT_AES : CRYPT_NONE,
    l1TableOffset,
  };
  const fileSize = l1TableOffset + alignUp(8 * l1Size, 512);
  await store.truncate(0);
  const head = new Uint8Array(l1TableOffset);
  head.set(encodeHeader(header));
  head.set(name, HEADER_SIZE);
  await store.write(0, head);
  // The (all-zero) L1 table and the padding after it.
  await store.truncate(fileSize);
}
