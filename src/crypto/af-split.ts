/**
 * LUKS1 anti-forensic splitter. A key of n bytes is stored as `stripes` blocks of n bytes, so that
 * wiping any small part of the key material destroys the key. Merging XORs the stripes one by one
 * into an accumulator that is "diffused" (hashed in place, digest-sized chunk by chunk, each chunk
 * prefixed with its big-endian u32 index) after every stripe but the last.
 */
import type { CryptoPrimitives, HashAlg } from './primitives.js';
import { HASH_LENGTH, randomBytes } from './primitives.js';

function diffuse(prims: CryptoPrimitives, alg: HashAlg, block: Uint8Array): void {
  const digestLength = HASH_LENGTH[alg];
  const input = new Uint8Array(4 + digestLength);
  const index = new DataView(input.buffer);
  for (let off = 0, i = 0; off < block.length; off += digestLength, i++) {
    const chunk = block.subarray(off, Math.min(block.length, off + digestLength));
    index.setUint32(0, i);
    input.set(chunk, 4);
    // A short last chunk hashes only its own bytes and keeps the first bytes of the digest.
    const digest = prims.hash(alg, input.subarray(0, 4 + chunk.length));
    chunk.set(digest.subarray(0, chunk.length));
  }
}

function xorInto(dst: Uint8Array, src: Uint8Array): void {
  for (let i = 0; i < dst.length; i++) dst[i] ^= src[i]!;
}

/** Recover a `keyLength`-byte key from `split` (at least keyLength * stripes bytes). */
export function afMerge(prims: CryptoPrimitives, alg: HashAlg, split: Uint8Array, keyLength: number, stripes: number): Uint8Array {
  const acc = new Uint8Array(keyLength);
  for (let s = 0; s < stripes - 1; s++) {
    xorInto(acc, split.subarray(s * keyLength, (s + 1) * keyLength));
    diffuse(prims, alg, acc);
  }
  xorInto(acc, split.subarray((stripes - 1) * keyLength, stripes * keyLength));
  return acc;
}

/** Split `key` into `stripes` blocks: random ones, then the one that makes afMerge return `key`. */
export function afSplit(prims: CryptoPrimitives, alg: HashAlg, key: Uint8Array, stripes: number): Uint8Array {
  const n = key.length;
  const split = randomBytes(n * stripes);
  split.fill(0, (stripes - 1) * n);
  const acc = new Uint8Array(n);
  for (let s = 0; s < stripes - 1; s++) {
    xorInto(acc, split.subarray(s * n, (s + 1) * n));
    diffuse(prims, alg, acc);
  }
  const last = split.subarray((stripes - 1) * n);
  last.set(acc);
  xorInto(last, key);
  return split;
}
