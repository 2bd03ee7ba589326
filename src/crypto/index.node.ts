/**
 * Node implementation of the crypto primitives: OpenSSL through node:crypto (AES-NI where the CPU
 * has it). PBKDF2 runs on libuv's thread pool so it does not block the event loop.
 */
import { createCipheriv, createDecipheriv, createHash, pbkdf2 as pbkdf2Cb } from 'node:crypto';
import { promisify } from 'node:util';
import type { CryptoPrimitives, HashAlg } from './primitives.js';

const pbkdf2P = promisify(pbkdf2Cb);
const SECTOR = 512;
const BLOCK = 16;

const asBytes = (b: Buffer): Uint8Array => new Uint8Array(b.buffer, b.byteOffset, b.byteLength);

function aesName(key: Uint8Array, mode: string): string {
  return `aes-${key.length * 8}-${mode}`;
}

/** One OpenSSL cipher per sector: CBC chains, so each sector needs a fresh IV. */
function cbcEncrypt(key: Uint8Array, ivs: Uint8Array, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(data.length);
  const name = aesName(key, 'cbc');
  for (let off = 0, i = 0; off < data.length; off += SECTOR, i++) {
    const c = createCipheriv(name, key, ivs.subarray(i * BLOCK, i * BLOCK + BLOCK)).setAutoPadding(false);
    out.set(c.update(data.subarray(off, off + SECTOR)), off);
    c.final();
  }
  return out;
}

/**
 * CBC decryption has no chain dependency on the output, so decrypt every block at once in ECB
 * mode, then XOR each block with the previous ciphertext block (or the sector's IV for a sector's
 * first block), 32 bits at a time.
 */
function cbcDecrypt(key: Uint8Array, ivs: Uint8Array, data: Uint8Array): Uint8Array {
  const d = createDecipheriv(aesName(key, 'ecb'), key, null).setAutoPadding(false);
  const out = new Uint8Array(data.length); // fresh, so 4-byte aligned
  out.set(d.update(data));
  d.final();
  const o32 = new Uint32Array(out.buffer, 0, data.length >>> 2);
  const c = new Uint8Array(data.length); // aligned copy of the ciphertext
  c.set(data);
  const c32 = new Uint32Array(c.buffer, 0, data.length >>> 2);
  const iv = new Uint8Array(ivs.length);
  iv.set(ivs);
  const iv32 = new Uint32Array(iv.buffer, 0, ivs.length >>> 2);
  const wordsPerSector = SECTOR >>> 2;
  for (let s = 0, w = 0; w < o32.length; s++) {
    const base = w;
    o32[w] ^= iv32[s * 4]!;
    o32[w + 1] ^= iv32[s * 4 + 1]!;
    o32[w + 2] ^= iv32[s * 4 + 2]!;
    o32[w + 3] ^= iv32[s * 4 + 3]!;
    for (w += 4; w < base + wordsPerSector; w++) o32[w] ^= c32[w - 4]!;
  }
  return out;
}

function xtsSectors(key: Uint8Array, tweaks: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array {
  const out = new Uint8Array(data.length);
  const name = `aes-${(key.length / 2) * 8}-xts`;
  for (let off = 0, i = 0; off < data.length; off += SECTOR, i++) {
    const tweak = tweaks.subarray(i * BLOCK, i * BLOCK + BLOCK);
    const c = encrypt ? createCipheriv(name, key, tweak) : createDecipheriv(name, key, tweak);
    out.set(c.update(data.subarray(off, off + SECTOR)), off);
    c.final();
  }
  return out;
}

export const primitives: CryptoPrimitives = {
  cbcSectors: (key, ivs, data, encrypt) => (encrypt ? cbcEncrypt(key, ivs, data) : cbcDecrypt(key, ivs, data)),
  xtsSectors,
  ecbEncrypt(key, data) {
    const c = createCipheriv(aesName(key, 'ecb'), key, null).setAutoPadding(false);
    const out = asBytes(c.update(data));
    c.final();
    return out;
  },
  hash: (alg: HashAlg, data) => asBytes(createHash(alg).update(data).digest()),
  async pbkdf2(alg, password, salt, iterations, keyLength) {
    return asBytes(await pbkdf2P(password, salt, iterations, keyLength, alg));
  },
};
