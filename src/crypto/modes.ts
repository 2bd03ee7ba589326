/**
 * CBC and XTS over 512-byte sectors, built once here on top of a bulk AES-ECB primitive, so both
 * platforms share the same mode code and only the block cipher differs. Everything is done on
 * whole buffers with 32-bit word XORs: Node's OpenSSL ECB runs over the whole batch in one call,
 * which is far faster than a new OpenSSL cipher object per sector.
 */
import { unsupported } from '../core/errors.js';
import type { AesEcb } from './primitives.js';

const SECTOR = 512;
const BLOCK = 16;
const WORDS_PER_SECTOR = SECTOR / 4;
const BLOCKS_PER_SECTOR = SECTOR / BLOCK;

// XTS treats each 16-byte block as a little-endian 128-bit number; the word code below reads
// bytes through Uint32Array, so it needs a little-endian host (every Node/browser platform is).
const littleEndian = new Uint8Array(Uint32Array.of(1).buffer)[0] === 1;

/** A 4-byte-aligned private copy of `b` as words (and its bytes). */
function alignedCopy(b: Uint8Array): [Uint8Array, Uint32Array] {
  const bytes = new Uint8Array(b.length);
  bytes.set(b);
  return [bytes, new Uint32Array(bytes.buffer, 0, b.length >>> 2)];
}

/** Words of `b`, copying only when its offset is not 4-byte aligned. */
function wordsOf(b: Uint8Array): [Uint8Array, Uint32Array] {
  return b.byteOffset % 4 === 0 ? [b, new Uint32Array(b.buffer, b.byteOffset, b.length >>> 2)] : alignedCopy(b);
}

/**
 * CBC encryption of n independent sectors, done as 32 steps over all sectors at once: step j
 * enciphers block j of every sector (plaintext XOR the previous ciphertext block, or the IV).
 */
export function cbcEncryptSectors(ecb: AesEcb, ivs: Uint8Array, data: Uint8Array): Uint8Array {
  const n = data.length / SECTOR;
  const [, p] = wordsOf(data);
  const [, iv] = wordsOf(ivs);
  const out = new Uint8Array(data.length);
  const o = new Uint32Array(out.buffer);
  const lane = new Uint32Array(n * 4);
  const laneBytes = new Uint8Array(lane.buffer);
  for (let j = 0; j < BLOCKS_PER_SECTOR; j++) {
    for (let s = 0; s < n; s++) {
      const w = s * WORDS_PER_SECTOR + j * 4;
      const prev = j === 0 ? iv : o;
      const pw = j === 0 ? s * 4 : w - 4;
      lane[s * 4] = p[w]! ^ prev[pw]!;
      lane[s * 4 + 1] = p[w + 1]! ^ prev[pw + 1]!;
      lane[s * 4 + 2] = p[w + 2]! ^ prev[pw + 2]!;
      lane[s * 4 + 3] = p[w + 3]! ^ prev[pw + 3]!;
    }
    const [, c] = wordsOf(ecb.encrypt(laneBytes));
    for (let s = 0; s < n; s++) {
      const w = s * WORDS_PER_SECTOR + j * 4;
      o[w] = c[s * 4]!;
      o[w + 1] = c[s * 4 + 1]!;
      o[w + 2] = c[s * 4 + 2]!;
      o[w + 3] = c[s * 4 + 3]!;
    }
  }
  return out;
}

/** CBC decryption: decipher every block in one ECB call, then XOR with the previous ciphertext block or the IV. */
export function cbcDecryptSectors(ecb: AesEcb, ivs: Uint8Array, data: Uint8Array): Uint8Array {
  const [out, o] = alignedCopy(ecb.decrypt(data));
  const [, c] = wordsOf(data);
  const [, iv] = wordsOf(ivs);
  for (let s = 0, w = 0; w < o.length; s++) {
    const end = w + WORDS_PER_SECTOR;
    o[w] ^= iv[s * 4]!;
    o[w + 1] ^= iv[s * 4 + 1]!;
    o[w + 2] ^= iv[s * 4 + 2]!;
    o[w + 3] ^= iv[s * 4 + 3]!;
    for (w += 4; w < end; w++) o[w] ^= c[w - 4]!;
  }
  return out;
}

/**
 * XTS (IEEE 1619) masks for every block: T0 = AES_k2(tweak) per sector, then each next block's
 * mask is the previous one times x in GF(2^128) (reduction x^128 + x^7 + x^2 + x + 1).
 */
function xtsMasks(tweakEcb: AesEcb, tweaks: Uint8Array, n: number): Uint32Array {
  if (!littleEndian) throw unsupported('XTS needs a little-endian host');
  const [, t0] = wordsOf(tweakEcb.encrypt(tweaks));
  const m = new Uint32Array(n * WORDS_PER_SECTOR);
  for (let s = 0; s < n; s++) {
    let w = s * WORDS_PER_SECTOR;
    let a = t0[s * 4]!, b = t0[s * 4 + 1]!, c = t0[s * 4 + 2]!, d = t0[s * 4 + 3]!;
    for (let j = 0; j < BLOCKS_PER_SECTOR; j++, w += 4) {
      m[w] = a;
      m[w + 1] = b;
      m[w + 2] = c;
      m[w + 3] = d;
      const carry = d >>> 31;
      d = (d << 1) | (c >>> 31);
      c = (c << 1) | (b >>> 31);
      b = (b << 1) | (a >>> 31);
      a = (a << 1) ^ (carry * 0x87);
    }
  }
  return m;
}

export function xtsSectors(dataEcb: AesEcb, tweakEcb: AesEcb, tweaks: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array {
  const m = xtsMasks(tweakEcb, tweaks, data.length / SECTOR);
  const [x, xw] = alignedCopy(data);
  for (let i = 0; i < xw.length; i++) xw[i] ^= m[i]!;
  const [out, o] = alignedCopy(encrypt ? dataEcb.encrypt(x) : dataEcb.decrypt(x));
  for (let i = 0; i < o.length; i++) o[i] ^= m[i]!;
  return out;
}
