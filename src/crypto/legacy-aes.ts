/**
 * QEMU's legacy "AES" encryption: qcow v1 and qcow2 crypt_method 1.
 *
 * AES-128-CBC with no padding, each 512-byte sector enciphered on its own with a "plain64" IV of
 * the GUEST sector number. The key is the password's UTF-8 bytes cut or zero-padded to 16 bytes:
 * no KDF, no salt, and no check value, so a wrong password is not detected and yields garbage
 * (as in QEMU). qcow2.txt claims 256-bit keys; qemu 7.2 really uses 128 (docs/notes/qcow2-pitfalls.md §9.1).
 */
import { primitives } from '#crypto';
import { encodeUtf8 } from '../core/bytes.js';
import { sectorRun } from './sector-run.js';
import type { SectorCipher } from './types.js';

const KEY_LENGTH = 16;

/** The 16-byte AES key QEMU derives from a legacy-AES password. */
export function legacyAesKey(password: string): Uint8Array {
  const key = new Uint8Array(KEY_LENGTH);
  const bytes = encodeUtf8(password);
  key.set(bytes.subarray(0, KEY_LENGTH));
  return key;
}

/** A SectorCipher for legacy AES; pass the guest sector number (guest offset / 512). */
export async function legacyAesCipher(password: string): Promise<SectorCipher> {
  const run = sectorRun(primitives, 'cbc', legacyAesKey(password), 'plain64');
  return {
    encrypt: async (data, firstSector) => run(data, firstSector, true),
    decrypt: async (data, firstSector) => run(data, firstSector, false),
    decryptInPlace: async (data, firstSector) => void run(data, firstSector, false, data),
  };
}
