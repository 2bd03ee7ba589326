/**
 * The sector cipher a LUKS header describes, for a given key (the master key for the payload, a
 * slot key for key material). Sector numbers are the caller's: QCOW2 passes the HOST sector
 * (host offset / 512) for payload data; key material counts from sector 0 at its own start.
 */
import { plain64Ivs, plainIvs } from './iv.js';
import type { CryptoPrimitives } from './primitives.js';
import type { LuksCipherSpec } from './luks-header.js';
import { checkWholeSectors } from './sectors.js';
import { cbcDecryptSectors, cbcEncryptSectors, xtsSectors } from './modes.js';
import type { SectorCipher } from './types.js';

/** A SectorCipher with synchronous twins, for key material handled inside this module. */
export interface LuksSectorCipher extends SectorCipher {
  encryptSync(data: Uint8Array, firstSector: number): Uint8Array;
  decryptSync(data: Uint8Array, firstSector: number): Uint8Array;
}

export function luksSectorCipher(prims: CryptoPrimitives, spec: LuksCipherSpec, key: Uint8Array): LuksSectorCipher {
  let ivs: (first: number, count: number) => Uint8Array;
  if (spec.ivGen === 'plain64') ivs = plain64Ivs;
  else if (spec.ivGen === 'plain') ivs = plainIvs;
  else {
    // ESSIV: IV = AES_{hash(key)}(plain64 sector number); the AES size follows the digest size.
    const essiv = prims.aesEcb(prims.hash(spec.ivGenHash!, key));
    ivs = (first, count) => essiv.encrypt(plain64Ivs(first, count));
  }
  let run: (data: Uint8Array, firstSector: number, encrypt: boolean) => Uint8Array;
  if (spec.cipherMode === 'xts') {
    // The XTS key is two AES keys: the first enciphers data, the second the tweak.
    const half = key.length / 2;
    const dataEcb = prims.aesEcb(key.subarray(0, half));
    const tweakEcb = prims.aesEcb(key.subarray(half));
    run = (data, firstSector, encrypt) => xtsSectors(dataEcb, tweakEcb, ivs(firstSector, checkWholeSectors(data)), data, encrypt);
  } else {
    const ecb = prims.aesEcb(key);
    run = (data, firstSector, encrypt) => {
      const sectorIvs = ivs(firstSector, checkWholeSectors(data));
      return encrypt ? cbcEncryptSectors(ecb, sectorIvs, data) : cbcDecryptSectors(ecb, sectorIvs, data);
    };
  }
  return {
    encryptSync: (data, firstSector) => run(data, firstSector, true),
    decryptSync: (data, firstSector) => run(data, firstSector, false),
    encrypt: async (data, firstSector) => run(data, firstSector, true),
    decrypt: async (data, firstSector) => run(data, firstSector, false),
  };
}
