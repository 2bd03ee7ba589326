/**
 * The sector cipher a LUKS header describes, for a given key (the master key for the payload, a
 * slot key for key material). Sector numbers are the caller's: QCOW2 passes the HOST sector
 * (host offset / 512) for payload data; key material counts from sector 0 at its own start.
 */
import { plain64Ivs, plainIvs } from './iv.js';
import type { CryptoPrimitives } from './primitives.js';
import type { LuksCipherSpec } from './luks-header.js';
import { sectorRun, type IvSource } from './sector-run.js';
import type { SectorCipher } from './types.js';

/** A SectorCipher with synchronous twins, for key material handled inside this module. */
export interface LuksSectorCipher extends SectorCipher {
  encryptSync(data: Uint8Array, firstSector: number): Uint8Array;
  decryptSync(data: Uint8Array, firstSector: number): Uint8Array;
}

export function luksSectorCipher(prims: CryptoPrimitives, spec: LuksCipherSpec, key: Uint8Array): LuksSectorCipher {
  let ivs: IvSource;
  if (spec.ivGen === 'plain64') ivs = 'plain64';
  else if (spec.ivGen === 'plain') ivs = plainIvs;
  else {
    // ESSIV: IV = AES_{hash(key)}(plain64 sector number); the AES size follows the digest size.
    const essiv = prims.aesEcb(prims.hash(spec.ivGenHash!, key));
    ivs = (first, count) => essiv.encrypt(plain64Ivs(first, count));
  }
  // The XTS key is two AES keys: the first enciphers data, the second the tweak.
  const run = sectorRun(prims, spec.cipherMode, key, ivs);
  return {
    encryptSync: (data, firstSector) => run(data, firstSector, true),
    decryptSync: (data, firstSector) => run(data, firstSector, false),
    encrypt: async (data, firstSector) => run(data, firstSector, true),
    decrypt: async (data, firstSector) => run(data, firstSector, false),
    decryptInPlace: async (data, firstSector) => void run(data, firstSector, false, data),
  };
}
