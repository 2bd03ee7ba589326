/**
 * Browser implementation of the crypto primitives, in pure JS from @noble/ciphers and
 * @noble/hashes. XTS is built here over AES-ECB because noble has no XTS mode.
 */
import { cbc, ecb } from '@noble/ciphers/aes.js';
import { sha1 } from '@noble/hashes/legacy.js';
import { sha224, sha256, sha384, sha512 } from '@noble/hashes/sha2.js';
import { pbkdf2Async } from '@noble/hashes/pbkdf2.js';
import type { CryptoPrimitives, HashAlg } from './primitives.js';

const SECTOR = 512;
const BLOCK = 16;
const HASHES = { sha1, sha224, sha256, sha384, sha512 } as const;

function cbcSectors(key: Uint8Array, ivs: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array {
  const out = new Uint8Array(data.length);
  for (let off = 0, i = 0; off < data.length; off += SECTOR, i++) {
    const c = cbc(key, ivs.subarray(i * BLOCK, i * BLOCK + BLOCK), { disablePadding: true });
    const sector = data.subarray(off, off + SECTOR);
    out.set(encrypt ? c.encrypt(sector) : c.decrypt(sector), off);
  }
  return out;
}

/** masks[to..to+16] = masks[from..from+16] times x in GF(2^128), bytes little-endian. */
function doubleTweak(masks: Uint8Array, from: number, to: number): void {
  const carry = masks[from + BLOCK - 1]! >>> 7;
  for (let k = BLOCK - 1; k > 0; k--) masks[to + k] = ((masks[from + k]! << 1) | (masks[from + k - 1]! >>> 7)) & 0xff;
  masks[to] = ((masks[from]! << 1) & 0xff) ^ (carry ? 0x87 : 0);
}

/**
 * XTS per IEEE 1619: T0 = AES_k2(tweak); block j is C = AES_k1(P xor Tj) xor Tj, and Tj+1 is Tj
 * multiplied by x in GF(2^128) (little-endian bytes, reduction polynomial x^128+x^7+x^2+x+1).
 * 512-byte sectors are whole blocks, so no ciphertext stealing is needed.
 */
function xtsSectors(key: Uint8Array, tweaks: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array {
  const half = key.length / 2;
  const dataCipher = ecb(key.subarray(0, half), { disablePadding: true });
  const t0 = ecb(key.subarray(half), { disablePadding: true }).encrypt(tweaks);
  const masks = new Uint8Array(data.length);
  for (let off = 0, i = 0; off < data.length; off += SECTOR, i++) {
    masks.set(t0.subarray(i * BLOCK, i * BLOCK + BLOCK), off);
    for (let b = off + BLOCK; b < off + SECTOR; b += BLOCK) doubleTweak(masks, b - BLOCK, b);
  }
  const x = new Uint8Array(data.length);
  for (let k = 0; k < data.length; k++) x[k] = data[k]! ^ masks[k]!;
  const y = encrypt ? dataCipher.encrypt(x) : dataCipher.decrypt(x);
  for (let k = 0; k < data.length; k++) y[k] ^= masks[k]!;
  return y;
}

export const primitives: CryptoPrimitives = {
  cbcSectors,
  xtsSectors,
  ecbEncrypt: (key, data) => ecb(key, { disablePadding: true }).encrypt(data),
  hash: (alg: HashAlg, data) => HASHES[alg](data),
  pbkdf2: (alg, password, salt, iterations, keyLength) => pbkdf2Async(HASHES[alg], password, salt, { c: iterations, dkLen: keyLength, asyncTick: 10 }),
};
