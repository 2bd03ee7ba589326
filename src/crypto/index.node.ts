/**
 * Node implementation of the crypto primitives: OpenSSL through node:crypto (AES-NI where the CPU
 * has it). PBKDF2 runs on libuv's thread pool so it does not block the event loop.
 */
import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import { hostAddon } from '../host/native.node.js';
import type { AesEcb, AesSectorMode, CryptoPrimitives, HashAlg } from './primitives.js';

type NodeCrypto = typeof import('node:crypto');

/**
 * node:crypto, loaded at the first use: every image opener imports this module (the LUKS format
 * is among the formats probed), and loading node:crypto (with node:stream under it) cost every
 * command ~190 page faults and ~4 ms of CPU although only encrypted images use it.
 */
let nodeCrypto: NodeCrypto | undefined;
const crypto = (): NodeCrypto =>
  // process.getBuiltinModule (Node 20.16 and later) skips createRequire's set-up (~180 page faults).
  (nodeCrypto ??= typeof process.getBuiltinModule === 'function' ? process.getBuiltinModule('node:crypto') : (createRequire(import.meta.url)('node:crypto') as NodeCrypto));

let pbkdf2Promised: ((password: Uint8Array, salt: Uint8Array, iterations: number, keyLength: number, digest: string) => Promise<Buffer>) | undefined;

const asBytes = (b: Buffer): Uint8Array => new Uint8Array(b.buffer, b.byteOffset, b.byteLength);

/**
 * One OpenSSL context per direction, kept for the key's lifetime: ECB without padding carries no
 * state between update() calls, so each call is an independent batch and final() is never needed.
 */
function aesEcb(key: Uint8Array): AesEcb {
  const name = `aes-${key.length * 8}-ecb`;
  const { createCipheriv, createDecipheriv } = crypto();
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
  hash: (alg: HashAlg, data) => asBytes(crypto().createHash(alg).update(data).digest()),
  async pbkdf2(alg, password, salt, iterations, keyLength) {
    pbkdf2Promised ??= promisify(crypto().pbkdf2);
    return asBytes(await pbkdf2Promised(password, salt, iterations, keyLength, alg));
  },
};
