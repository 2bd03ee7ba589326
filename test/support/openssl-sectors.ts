/**
 * The reference for our sector ciphers: OpenSSL's own AES-XTS or AES-CBC through node:crypto, one
 * cipher object per 512-byte sector with that sector's 16-byte IV (slow, and obviously right).
 */
import { createCipheriv, createDecipheriv } from 'node:crypto';

export function opensslSectors(mode: 'xts' | 'cbc', key: Uint8Array, ivs: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array {
  const name = `aes-${(mode === 'xts' ? key.length / 2 : key.length) * 8}-${mode}`;
  const out = new Uint8Array(data.length);
  for (let i = 0; i * 512 < data.length; i++) {
    const iv = ivs.subarray(i * 16, i * 16 + 16);
    const c = encrypt ? createCipheriv(name, key, iv) : createDecipheriv(name, key, iv);
    c.setAutoPadding(false);
    out.set(Buffer.concat([c.update(data.subarray(i * 512, i * 512 + 512)), c.final()]), i * 512);
  }
  return out;
}
