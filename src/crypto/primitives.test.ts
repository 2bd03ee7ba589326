/**
 * The Node (OpenSSL) and browser (@noble, hand-built XTS) primitives must produce identical bytes:
 * images written in one runtime are read in the other. OpenSSL is the reference here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { primitives as nodePrimitives } from './index.node.js';
import { primitives as browserPrimitives } from './index.browser.js';
import { plain64Ivs, plainIvs } from './iv.js';
import { afMerge, afSplit } from './af-split.js';
import type { HashAlg } from './primitives.js';
import { randomBytes } from '../test-support/qemu.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

test('plain64 IVs are the LE u64 sector number; plain IVs cut it to 32 bits', () => {
  assert.equal(hex(plain64Ivs(0x1_0000_0100, 1)), '0001000001000000' + '00'.repeat(8));
  assert.equal(hex(plainIvs(0x1_0000_0100, 1)), '0001000000000000' + '00'.repeat(8));
  assert.equal(hex(plain64Ivs(256, 2)), '0001' + '00'.repeat(14) + '0101' + '00'.repeat(14));
  assert.throws(() => plain64Ivs(-1, 1), { code: 'QCOW_INVALID_ARGUMENT' });
});

for (const keyLength of [32, 64]) {
  test(`AES-${keyLength * 4}-XTS: browser XTS over ECB equals OpenSSL, both directions`, () => {
    const key = randomBytes(keyLength, keyLength);
    const data = randomBytes(16 * 512, 5);
    const tweaks = plain64Ivs(0x7fff_fff0, 16);
    const enc = nodePrimitives.xtsSectors(key, tweaks, data, true);
    assert.notDeepEqual(enc, data);
    assert.deepEqual(browserPrimitives.xtsSectors(key, tweaks, data, true), enc);
    assert.deepEqual(browserPrimitives.xtsSectors(key, tweaks, enc, false), data);
    assert.deepEqual(nodePrimitives.xtsSectors(key, tweaks, enc, false), data);
  });
}

for (const keyLength of [16, 24, 32]) {
  test(`AES-${keyLength * 8}-CBC per sector and ECB: identical in both implementations`, () => {
    const key = randomBytes(keyLength, 9);
    const data = randomBytes(4 * 512, 10);
    const ivs = randomBytes(4 * 16, 11);
    const enc = nodePrimitives.cbcSectors(key, ivs, data, true);
    assert.deepEqual(browserPrimitives.cbcSectors(key, ivs, data, true), enc);
    assert.deepEqual(nodePrimitives.cbcSectors(key, ivs, enc, false), data);
    assert.deepEqual(browserPrimitives.cbcSectors(key, ivs, enc, false), data);
    assert.deepEqual(browserPrimitives.ecbEncrypt(key, data), nodePrimitives.ecbEncrypt(key, data));
  });
}

test('hashes and PBKDF2 agree between implementations', async () => {
  const data = randomBytes(1000, 12);
  for (const alg of ['sha1', 'sha224', 'sha256', 'sha384', 'sha512'] as HashAlg[]) {
    assert.deepEqual(browserPrimitives.hash(alg, data), nodePrimitives.hash(alg, data), alg);
    const a = await nodePrimitives.pbkdf2(alg, data.subarray(0, 7), data.subarray(7, 39), 1000, 64);
    const b = await browserPrimitives.pbkdf2(alg, data.subarray(0, 7), data.subarray(7, 39), 1000, 64);
    assert.deepEqual(b, a, `pbkdf2 ${alg}`);
  }
});

test('anti-forensic split then merge gives the key back, including a short last hash chunk', () => {
  for (const alg of ['sha1', 'sha256', 'sha512'] as HashAlg[]) {
    for (const keyLength of [16, 24, 32, 48, 64]) {
      const key = randomBytes(keyLength, keyLength + 100);
      const split = afSplit(nodePrimitives, alg, key, 50);
      assert.equal(split.length, keyLength * 50);
      assert.deepEqual(afMerge(nodePrimitives, alg, split, keyLength, 50), key, `${alg} ${keyLength}`);
      assert.deepEqual(afMerge(browserPrimitives, alg, split, keyLength, 50), key, `${alg} ${keyLength} (browser)`);
      // Every stripe matters: flip one bit anywhere and the key is lost.
      split[keyLength * 3] ^= 1;
      assert.notDeepEqual(afMerge(nodePrimitives, alg, split, keyLength, 50), key);
    }
  }
});
