/**
 * The few cryptographic building blocks the sector ciphers and LUKS need, as one interface with a
 * Node implementation (index.node.ts, node:crypto/OpenSSL) and a browser one (index.browser.ts,
 * @noble/*). Code that must run in a browser imports the implementation through '#crypto', which
 * package.json maps to the right file per platform.
 *
 * The block operations work on batches of 512-byte sectors with one 16-byte IV (or XTS tweak) per
 * sector, so an implementation can amortise per-call setup over a whole cluster.
 */
export type HashAlg = 'sha1' | 'sha224' | 'sha256' | 'sha384' | 'sha512';

export const HASH_LENGTH: Readonly<Record<HashAlg, number>> = { sha1: 20, sha224: 28, sha256: 32, sha384: 48, sha512: 64 };

export const isHashAlg = (name: string): name is HashAlg => Object.hasOwn(HASH_LENGTH, name);

export interface CryptoPrimitives {
  /**
   * AES-CBC without padding, each 512-byte sector of `data` chained on its own from the IV at
   * `ivs[16*i .. 16*i+16]`. Key length picks AES-128/192/256. Returns new bytes.
   */
  cbcSectors(key: Uint8Array, ivs: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array;
  /**
   * AES-XTS (IEEE 1619) over each 512-byte sector with the tweak at `tweaks[16*i .. 16*i+16]`.
   * `key` is both halves: 32 bytes for AES-128-XTS, 64 for AES-256-XTS. Returns new bytes.
   */
  xtsSectors(key: Uint8Array, tweaks: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array;
  /** AES-ECB encryption of whole 16-byte blocks (ESSIV derives IVs with it). */
  ecbEncrypt(key: Uint8Array, data: Uint8Array): Uint8Array;
  hash(alg: HashAlg, data: Uint8Array): Uint8Array;
  /** PBKDF2-HMAC-`alg`. Node runs it on the thread pool; the browser variant yields now and then. */
  pbkdf2(alg: HashAlg, password: Uint8Array, salt: Uint8Array, iterations: number, keyLength: number): Promise<Uint8Array>;
}

/** Cryptographically strong random bytes (Web Crypto exists both in Node 20 and browsers). */
export function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  // getRandomValues fills at most 65536 bytes per call.
  for (let off = 0; off < n; off += 65536) globalThis.crypto.getRandomValues(out.subarray(off, Math.min(n, off + 65536)));
  return out;
}
