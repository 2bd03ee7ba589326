/**
 * Browser implementation of the crypto primitives, in pure JS from @noble/ciphers and
 * @noble/hashes. The sector modes (CBC, XTS) are shared with Node in modes.ts.
 */
import { ecb } from '@noble/ciphers/aes.js';
import { sha1 } from '@noble/hashes/legacy.js';
import { sha224, sha256, sha384, sha512 } from '@noble/hashes/sha2.js';
import { pbkdf2Async } from '@noble/hashes/pbkdf2.js';
import type { AesEcb, CryptoPrimitives, HashAlg } from './primitives.js';

const HASHES = { sha1, sha224, sha256, sha384, sha512 } as const;

function aesEcb(key: Uint8Array): AesEcb {
  const k = key.slice();
  // A fresh noble instance per call: noble refuses to reuse some cipher instances.
  return {
    encrypt: (data) => ecb(k, { disablePadding: true }).encrypt(data),
    decrypt: (data) => ecb(k, { disablePadding: true }).decrypt(data),
  };
}

export const primitives: CryptoPrimitives = {
  aesEcb,
  hash: (alg: HashAlg, data) => HASHES[alg](data),
  pbkdf2: (alg, password, salt, iterations, keyLength) => pbkdf2Async(HASHES[alg], password, salt, { c: iterations, dkLen: keyLength, asyncTick: 10 }),
};
