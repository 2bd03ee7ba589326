/**
 * qcow2 encryption set-up: legacy AES (crypt_method 1, IV = guest sector) and LUKS (crypt_method
 * 2, the LUKS header in the area the FDE extension points at, IV = host sector). Without a
 * password the image opens only for inspection (`OpenOptions.inspectOnly`): `info` works, reads
 * fail with QCOW_NEED_PASSWORD.
 */
import type { OpenOptions } from '../../core/block-device.js';
import { QcowError, unsupported } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import type { SectorCipher } from '../../crypto/types.js';
import { legacyAesCipher } from '../../crypto/legacy-aes.js';
import type { Qcow2Header } from './header.js';

export interface Qcow2Encryption {
  format: 'aes' | 'luks';
  /** LUKS in qcow2 uses the host sector number as IV; legacy AES the guest sector. */
  ivFromHostSector: boolean;
  /** What qemu-img info prints as format-specific "encrypt". */
  info: Record<string, unknown>;
  /** The cipher; throws QCOW_NEED_PASSWORD when the image was opened without one. */
  cipher(): SectorCipher;
}

export async function openEncryption(_store: ByteStore, h: Qcow2Header, _fileSize: number, options: OpenOptions): Promise<Qcow2Encryption> {
  if (options.password === undefined && !options.inspectOnly) {
    throw new QcowError('QCOW_NEED_PASSWORD', 'image is encrypted: a password is required (--password-file)');
  }
  const locked = (): never => {
    throw new QcowError('QCOW_NEED_PASSWORD', 'image is encrypted: a password is required (--password-file)');
  };
  if (h.cryptMethod === 1) {
    const c = options.password !== undefined ? await legacyAesCipher(options.password) : undefined;
    return { format: 'aes', ivFromHostSector: false, info: { format: 'aes' }, cipher: () => c ?? locked() };
  }
  throw unsupported('LUKS encryption (crypt_method 2) is not available yet');
}
