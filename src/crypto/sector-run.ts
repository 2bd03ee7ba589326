/**
 * The sector cipher's work for one key: CBC or XTS over 512-byte sectors, through the platform's
 * whole-sector cipher when it has one (Node with the addon: OpenSSL's CBC/XTS in one call per
 * batch), else the modes over AES-ECB in modes.ts. Both give the same bytes.
 */
import { invalidArgument } from '../core/errors.js';
import { checkSector, plain64Ivs } from './iv.js';
import { cbcDecryptSectors, cbcEncryptSectors, xtsSectors } from './modes.js';
import type { CryptoPrimitives } from './primitives.js';
import { checkWholeSectors } from './sectors.js';

/**
 * `data` (whole sectors) enciphered or deciphered, sector i with number firstSector + i: into
 * `into` when given (data.length bytes; may be `data` itself), else into new bytes. Returns them.
 */
export type SectorRun = (data: Uint8Array, firstSector: number, encrypt: boolean, into?: Uint8Array) => Uint8Array;

/** IVs for `count` sectors from `first`; 'plain64' is named so that the native path makes them itself. */
export type IvSource = 'plain64' | ((first: number, count: number) => Uint8Array);

/** `key`: the AES key for CBC, both halves (data key, then tweak key) for XTS. */
export function sectorRun(prims: CryptoPrimitives, mode: 'cbc' | 'xts', key: Uint8Array, ivSource: IvSource): SectorRun {
  const native = prims.aesSectors?.(mode, key);
  if (native) {
    return (data, firstSector, encrypt, into) => {
      const count = checkWholeSectors(data);
      let ivs: Uint8Array | number;
      if (ivSource === 'plain64') {
        checkSector(firstSector, count);
        ivs = firstSector;
      } else {
        ivs = ivSource(firstSector, count);
      }
      const out = into ?? new Uint8Array(data.length);
      if (out.length !== data.length) throw invalidArgument(`sector cipher output of ${out.length} bytes for ${data.length} bytes of input`);
      native.run(encrypt, data, out, ivs);
      return out;
    };
  }
  const ivs = ivSource === 'plain64' ? plain64Ivs : ivSource;
  let run: (data: Uint8Array, firstSector: number, encrypt: boolean) => Uint8Array;
  if (mode === 'xts') {
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
  return (data, firstSector, encrypt, into) => {
    const out = run(data, firstSector, encrypt);
    if (!into) return out;
    if (into.length !== data.length) throw invalidArgument(`sector cipher output of ${into.length} bytes for ${data.length} bytes of input`);
    into.set(out);
    return into;
  };
}
