import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createDecipheriv } from 'node:crypto';
import { legacyAesCipher, legacyAesKey } from '#src/crypto/legacy-aes.js';
import { needs, qemuImg, qemuIo, randomBytes, scratch } from '../support/qemu.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

test('the key is the UTF-8 password cut or zero-padded to 16 bytes', () => {
  assert.equal(hex(legacyAesKey('hunter2')), '68756e74657232000000000000000000');
  assert.equal(hex(legacyAesKey('0123456789abcdefXYZ')), hex(new TextEncoder().encode('0123456789abcdef')));
  assert.equal(hex(legacyAesKey('')), '00'.repeat(16));
});

test('each sector is AES-128-CBC with a plain64 IV of its own sector number', async () => {
  const cipher = await legacyAesCipher('hunter2');
  const plain = randomBytes(3 * 512, 7);
  const first = 0x1_0000_0100; // above 2^32: plain64, not a 32-bit "plain" IV
  const enc = await cipher.encrypt(plain, first);
  for (let i = 0; i < 3; i++) {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt(first + i));
    const d = createDecipheriv('aes-128-cbc', legacyAesKey('hunter2'), iv).setAutoPadding(false);
    const sector = Buffer.concat([d.update(enc.subarray(i * 512, i * 512 + 512)), d.final()]);
    assert.equal(hex(sector), hex(plain.subarray(i * 512, i * 512 + 512)), `sector ${i}`);
  }
  assert.deepEqual(await cipher.decrypt(enc, first), plain);
});

test('input that is not whole sectors is refused', async () => {
  const cipher = await legacyAesCipher('x');
  await assert.rejects(cipher.decrypt(new Uint8Array(100), 0), { code: 'QCOW_INVALID_ARGUMENT' });
});

test('decrypts a sector of a qemu-made AES qcow v1 image, and re-encrypts it to the same bytes', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'aes.qcow');
  await qemuImg(['create', '-q', '-f', 'qcow', '--object', 'secret,id=sec0,data=hunter2', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', img, '1M']);
  await qemuIo(['--object', 'secret,id=sec0,data=hunter2', '--image-opts', `driver=qcow,file.filename=${img},encrypt.key-secret=sec0`, '-c', 'write -P 0xab 128k 64k']);
  const file = await readFile(img);
  // Layout from docs/notes/qcow1.md §10.4: header, L1, one L2 at 0x1000, then the first data cluster
  // (guest 128 KiB = guest sector 256) at 0x2000; 4 KiB clusters = 8 sectors.
  const ciphertext = new Uint8Array(file.subarray(0x2000, 0x3000));
  const cipher = await legacyAesCipher('hunter2');
  const plain = await cipher.decrypt(ciphertext, 256);
  assert.deepEqual(plain, new Uint8Array(4096).fill(0xab));
  assert.deepEqual(await cipher.encrypt(plain, 256), ciphertext);
  // No key check exists: a wrong password silently decrypts to garbage, like QEMU.
  const wrong = await (await legacyAesCipher('hunter3')).decrypt(ciphertext, 256);
  assert.notDeepEqual(wrong, plain);
});
