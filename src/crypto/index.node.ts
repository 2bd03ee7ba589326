/**
 * Node implementation of the crypto primitives: OpenSSL through node:crypto (AES-NI where the CPU
 * has it). PBKDF2 runs on libuv's thread pool so it does not block the event loop.
 */
import { createCipheriv, createDecipheriv, createHash, pbkdf2 as pbkdf2Cb } from 'node:crypto';
import { promisify } from 'node:util';
import { hostAddon } from '../host/native.node.js';
import type { AesEcb, AesSectorMode, CryptoPrimitives, HashAlg } from './primitives.js';

const pbkdf2P = promisify(pbkdf2Cb);

const asBytes = (b: Buffer): Uint8Array => new Uint8Array(b.buffer, b.byteOffset, b.byteLength);

/**
 * One OpenSSL context per direction, kept for the key's lifetime: ECB without padding carries no
 * state between update() calls, so each call is an independent batch and final() is never needed.
 */
function aesEcb(key: Uint8Array): AesEcb {
  const name = `aes-${key.length * 8}-ecb`;
  const enc = createCipheriv(name, key, null).setAutoPadding(false);
  const dec = createDecipheriv(name, key, null).setAutoPadding(false);
  return {
    encrypt: (data) => asBytes(enc.update(data)),
    decrypt: (data) => asBytes(dec.update(data)),
  };
}

/**
 * CBC/XTS sectors through the addon, on the OpenSSL node:crypto uses: node:crypto itself would need
 * a new cipher object per sector (an IV each); the modes over ECB (modes.ts) need extra passes and
 * copies (512 MiB on our VM: XTS 4-5x the addon's time, CBC 2-3.5x).
 */
function aesSectors(mode: 'cbc' | 'xts', key: Uint8Array): AesSectorMode | undefined {
  const addon = hostAddon();
  const cipher = addon?.aesSectors?.(mode === 'xts' ? 1 : 0, key);
  if (!cipher) return undefined;
  const run = addon!.aesSectorsRun!;
  return { run: (encrypt, src, dst, ivs) => run(cipher, encrypt, src, dst, ivs) };
}

export const primitives: CryptoPrimitives = {
  aesEcb,
  aesSectors,
  hash: (alg: HashAlg, data) => asBytes(createHash(alg).update(data).digest()),
  async pbkdf2(alg, password, salt, iterations, keyLength) {
    return asBytes(await pbkdf2P(password, salt, iterations, keyLength, alg));
  },
};
