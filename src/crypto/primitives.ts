/**
 * The few cryptographic building blocks the sector ciphers and LUKS need, as one interface with a
 * Node implementation (index.node.ts, node:crypto/OpenSSL) and a browser one (index.browser.ts,
 * @noble/*). Code that must run in a browser imports the implementation through '#crypto', which
 * package.json maps to the right file per platform.
 */
export type HashAlg = 'sha1' | 'sha224' | 'sha256' | 'sha384' | 'sha512';

export const HASH_LENGTH: Readonly<Record<HashAlg, number>> = { sha1: 20, sha224: 28, sha256: 32, sha384: 48, sha512: 64 };

export const isHashAlg = (name: string): name is HashAlg => Object.hasOwn(HASH_LENGTH, name);

/** AES in ECB mode over whole 16-byte blocks, bound to one key; calls are independent. */
export interface AesEcb {
  encrypt(data: Uint8Array): Uint8Array;
  decrypt(data: Uint8Array): Uint8Array;
}

/**
 * CBC or XTS over whole 512-byte sectors with one IV (or tweak) per sector, done whole by the
 * platform's own cipher: only where there is one (Node with qcow's addon). The modes in modes.ts
 * give the same bytes everywhere else.
 */
export interface AesSectorMode {
  /**
   * The sectors of `src` into `dst` (the same length; the same memory or apart, never partly
   * overlapping). `ivs`: 16 bytes per sector, or the first sector's number for plain64 IVs.
   */
  run(encrypt: boolean, src: Uint8Array, dst: Uint8Array, ivs: Uint8Array | number): void;
}

export interface CryptoPrimitives {
  /** Key length picks AES-128/192/256. Sector modes (CBC, XTS) are built on this in modes.ts. */
  aesEcb(key: Uint8Array): AesEcb;
  /** CBC (AES key) or XTS (both halves) for `key` when the platform has it whole, else undefined. */
  aesSectors?(mode: 'cbc' | 'xts', key: Uint8Array): AesSectorMode | undefined;
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
