/**
 * qcow2 encryption set-up: legacy AES (crypt_method 1, IV = guest sector) and LUKS (crypt_method
 * 2, the LUKS header in the area the FDE extension points at, IV = host sector). Without a
 * password the image opens only for inspection (`OpenOptions.inspectOnly`): `info` works, reads
 * fail with QCOW_NEED_PASSWORD.
 */
import type { OpenOptions } from '../../core/block-device.js';
import { QcowError, corrupt } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import type { SectorCipher } from '../../crypto/types.js';
import { legacyAesCipher } from '../../crypto/legacy-aes.js';
import { luksEncryptInfo, parseLuksHeader, unlockLuks } from '../../crypto/luks.js';
import { changeLuksSlots, type LuksSlotChange } from '../../crypto/luks-amend.js';
import type { Qcow2Header } from './header.js';

export interface Qcow2Encryption {
  format: 'aes' | 'luks';
  /** LUKS in qcow2 uses the host sector number as IV; legacy AES the guest sector. */
  ivFromHostSector: boolean;
  /** What qemu-img info prints as format-specific "encrypt". */
  info: Record<string, unknown>;
  /** The cipher; throws QCOW_NEED_PASSWORD when the image was opened without one. */
  cipher(): SectorCipher;
  /** LUKS opened with its password: add or erase key slots (qemu-img amend -o encrypt.state=...). */
  changeSlots?(change: LuksSlotChange): Promise<void>;
}

/** The LUKS header is 592 bytes; read the first 4 KiB of the area to parse it. */
const LUKS_HEADER_READ = 4096;

export async function openEncryption(store: ByteStore, h: Qcow2Header, fileSize: number, options: OpenOptions): Promise<Qcow2Encryption> {
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
  // crypt_method 2: LUKS1 in the area the full-disk-encryption extension points at.
  const fde = h.fde;
  if (!fde) throw corrupt('LUKS-encrypted image has no full disk encryption header extension');
  if (fde.offset % 2 ** h.clusterBits !== 0 || fde.offset === 0 || fde.offset + fde.length > fileSize || fde.length === 0) {
    throw corrupt(`LUKS header area [0x${fde.offset.toString(16)}, +0x${fde.length.toString(16)}) is misaligned or outside the file`);
  }
  const head = new Uint8Array(Math.min(LUKS_HEADER_READ, fde.length));
  await store.read(fde.offset, head);
  const luks = parseLuksHeader(head, fde.length);
  const info = luksEncryptInfo(luks) as unknown as Record<string, unknown>;
  if (options.password === undefined) return { format: 'luks', ivFromHostSector: true, info, cipher: locked };
  const readArea = async (offset: number, length: number) => {
    if (offset + length > fde.length) throw corrupt('LUKS key material lies outside the LUKS header area');
    const b = new Uint8Array(length);
    await store.read(fde.offset + offset, b);
    return b;
  };
  const { cipher, masterKey } = await unlockLuks(luks, readArea, options.password);
  let header = luks;
  const area = { read: readArea, write: (offset: number, bytes: Uint8Array) => store.write(fde.offset + offset, bytes) };
  const enc: Qcow2Encryption = {
    format: 'luks',
    ivFromHostSector: true,
    info,
    cipher: () => cipher,
    async changeSlots(change) {
      header = await changeLuksSlots(header, masterKey, area, change);
      // info shows the slots as they are now.
      Object.assign(info, luksEncryptInfo(header));
    },
  };
  return enc;
}
