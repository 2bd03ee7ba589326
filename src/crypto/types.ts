/**
 * Sector encryption as the QCOW formats use it: data is enciphered in 512-byte sectors, each with
 * an IV derived from a sector number (the guest sector for legacy AES, the host sector for LUKS
 * in qcow2). Implementations exist for Node (node:crypto) and browsers (pure JS).
 */
export interface SectorCipher {
  /** Encrypt `data` (a whole number of 512-byte sectors); sector i of `data` has number firstSector + i. Returns new bytes. */
  encrypt(data: Uint8Array, firstSector: number): Promise<Uint8Array>;
  decrypt(data: Uint8Array, firstSector: number): Promise<Uint8Array>;
  /**
   * Decrypt `data` where it lies (whole sectors): readers that own the buffer skip a second one
   * and a copy. Optional: callers fall back to decrypt() and a copy.
   */
  decryptInPlace?(data: Uint8Array, firstSector: number): Promise<void>;
}

export const SECTOR_SIZE = 512;
