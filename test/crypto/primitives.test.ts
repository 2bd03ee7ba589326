/**
 * The Node (OpenSSL) and browser (@noble) primitives must produce identical bytes: images written
 * in one runtime are read in the other. OpenSSL's native CBC and XTS are the reference for the
 * sector modes that modes.ts builds over either platform's AES-ECB.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { primitives as nodePrimitives } from '#src/crypto/index.node.js';
import { primitives as browserPrimitives } from '#src/crypto/index.browser.js';
import { plain64Ivs, plainIvs } from '#src/crypto/iv.js';
import { afMerge, afSplit } from '#src/crypto/af-split.js';
import { cbcDecryptSectors, cbcEncryptSectors, xtsSectors } from '#src/crypto/modes.js';
import type { HashAlg } from '#src/crypto/primitives.js';
import { randomBytes } from '../support/qemu.js';
import { opensslSectors } from '../support/openssl-sectors.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

test('plain64 IVs are the LE u64 sector number; plain IVs cut it to 32 bits', () => {
  assert.equal(hex(plain64Ivs(0x1_0000_0100, 1)), '0001000001000000' + '00'.repeat(8));
  assert.equal(hex(plainIvs(0x1_0000_0100, 1)), '0001000000000000' + '00'.repeat(8));
  assert.equal(hex(plain64Ivs(256, 2)), '0001' + '00'.repeat(14) + '0101' + '00'.repeat(14));
  assert.throws(() => plain64Ivs(-1, 1), { code: 'QCOW_INVALID_ARGUMENT' });
});


const both = [
  ['node', nodePrimitives],
  ['browser', browserPrimitives],
] as const;

for (const keyLength of [32, 64]) {
  test(`AES-${keyLength * 4}-XTS over each platform's ECB equals OpenSSL's XTS, both directions`, () => {
    const key = randomBytes(keyLength, keyLength);
    const data = randomBytes(16 * 512, 5);
    const tweaks = plain64Ivs(0x7fff_fff0, 16);
    const reference = opensslSectors('xts', key, tweaks, data, true);
    for (const [name, prims] of both) {
      const dataEcb = prims.aesEcb(key.subarray(0, keyLength / 2));
      const tweakEcb = prims.aesEcb(key.subarray(keyLength / 2));
      assert.deepEqual(xtsSectors(dataEcb, tweakEcb, tweaks, data, true), reference, name);
      assert.deepEqual(xtsSectors(dataEcb, tweakEcb, tweaks, reference, false), data, name);
      // Unaligned views work too (the modes use 32-bit words internally).
      const shifted = new Uint8Array(data.length + 1);
      shifted.set(reference, 1);
      assert.deepEqual(xtsSectors(dataEcb, tweakEcb, tweaks, shifted.subarray(1), false), data, `${name} unaligned`);
    }
  });
}

for (const keyLength of [16, 24, 32]) {
  test(`AES-${keyLength * 8}-CBC per sector over each platform's ECB equals OpenSSL's CBC, both directions`, () => {
    const key = randomBytes(keyLength, 9);
    const data = randomBytes(5 * 512, 10);
    const ivs = randomBytes(5 * 16, 11);
    const reference = opensslSectors('cbc', key, ivs, data, true);
    for (const [name, prims] of both) {
      const ecb = prims.aesEcb(key);
      assert.deepEqual(cbcEncryptSectors(ecb, ivs, data), reference, name);
      assert.deepEqual(cbcDecryptSectors(ecb, ivs, reference), data, name);
      const shifted = new Uint8Array(data.length + 3);
      shifted.set(reference, 3);
      assert.deepEqual(cbcDecryptSectors(ecb, ivs.slice(), shifted.subarray(3)), data, `${name} unaligned`);
      // The ECB contexts carry no state from one call to the next.
      assert.deepEqual(cbcEncryptSectors(ecb, ivs, data), reference, `${name} again`);
    }
    assert.deepEqual(browserPrimitives.aesEcb(key).encrypt(data), nodePrimitives.aesEcb(key).encrypt(data));
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
