/**
 * The whole-sector CBC/XTS path (the addon, on OpenSSL) and the fallback over AES-ECB (modes.ts)
 * must give the same bytes as OpenSSL's own per-sector CBC/XTS: images written with or without
 * the addon (QCOW_NO_NATIVE=1, the browser) are read by the other.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { primitives as nodePrimitives } from '#src/crypto/index.node.js';
import { primitives as browserPrimitives } from '#src/crypto/index.browser.js';
import { plain64Ivs } from '#src/crypto/iv.js';
import { sectorRun } from '#src/crypto/sector-run.js';
import type { CryptoPrimitives } from '#src/crypto/primitives.js';
import { legacyAesCipher } from '#src/crypto/legacy-aes.js';
import { hostAddon } from '#src/host/native.node.js';
import { randomBytes } from '../support/qemu.js';
import { opensslSectors } from '../support/openssl-sectors.js';

const native = hostAddon()?.aesSectors ? {} : { skip: 'the host addon (version 8+) is not loaded: no native sector cipher' };


/** The Node primitives without the native sector modes: the fallback, as QCOW_NO_NATIVE=1 runs it. */
const fallback: CryptoPrimitives = { ...nodePrimitives, aesSectors: undefined };

const cases = [
  ['cbc', 16],
  ['cbc', 24],
  ['cbc', 32],
  ['xts', 32],
  ['xts', 64],
] as const;

for (const [mode, keyLength] of cases) {
  test(`AES-${mode === 'xts' ? keyLength * 4 : keyLength * 8}-${mode.toUpperCase()}: native, fallback and browser runs equal OpenSSL's per-sector cipher`, () => {
    const key = randomBytes(keyLength, keyLength + 7);
    const data = randomBytes(9 * 512, 3);
    const first = 0x1_2345_6780; // past 32 bits: plain64 must keep the high word
    const ivs = plain64Ivs(first, 9);
    const sealed = opensslSectors(mode, key, ivs, data, true);
    const randomIvs = randomBytes(9 * 16, 4);
    const sealedRandom = opensslSectors(mode, key, randomIvs, data, true);
    for (const [name, prims] of [['node', nodePrimitives], ['fallback', fallback], ['browser', browserPrimitives]] as const) {
      const plain64 = sectorRun(prims, mode, key, 'plain64');
      assert.deepEqual(plain64(data, first, true), sealed, `${name} encrypt`);
      assert.deepEqual(plain64(sealed, first, false), data, `${name} decrypt`);
      const given = sectorRun(prims, mode, key, () => randomIvs);
      assert.deepEqual(given(data, first, true), sealedRandom, `${name} encrypt, IVs given`);
      assert.deepEqual(given(sealedRandom, first, false), data, `${name} decrypt, IVs given`);
      // Into a buffer of the caller's, and in place.
      const into = new Uint8Array(data.length);
      assert.equal(plain64(sealed, first, false, into), into);
      assert.deepEqual(into, data, `${name} into`);
      const inPlace = sealed.slice();
      plain64(inPlace, first, false, inPlace);
      assert.deepEqual(inPlace, data, `${name} in place`);
      // Views at odd offsets.
      const shifted = new Uint8Array(sealed.length + 3);
      shifted.set(sealed, 3);
      assert.deepEqual(plain64(shifted.subarray(3), first, false), data, `${name} unaligned`);
      assert.throws(() => plain64(data.subarray(0, 100), first, false), { code: 'QCOW_INVALID_ARGUMENT' });
      assert.throws(() => plain64(data, -1, false), { code: 'QCOW_INVALID_ARGUMENT' });
      assert.throws(() => plain64(data, first, false, new Uint8Array(512)), { code: 'QCOW_INVALID_ARGUMENT' });
    }
  });
}

test('CBC decryption of runs longer than the addon deciphers as one chain (256 sectors) equals the per-sector cipher', () => {
  const key = randomBytes(16, 21);
  const data = randomBytes(600 * 512, 22);
  const ivs = randomBytes(600 * 16, 23);
  const sealed = opensslSectors('cbc', key, ivs, data, true);
  const sealed64 = opensslSectors('cbc', key, plain64Ivs(1000, 600), data, true);
  for (const [name, prims] of [['node', nodePrimitives], ['fallback', fallback]] as const) {
    assert.deepEqual(sectorRun(prims, 'cbc', key, () => ivs)(sealed, 0, false), data, name);
    const inPlace = sealed64.slice();
    sectorRun(prims, 'cbc', key, 'plain64')(inPlace, 1000, false, inPlace);
    assert.deepEqual(inPlace, data, `${name} plain64 in place`);
  }
});

test('the native sector cipher is used for CBC and XTS keys, not for AES-192-XTS or XTS keys with equal halves', native, () => {
  assert.ok(nodePrimitives.aesSectors!('cbc', randomBytes(16, 1)));
  assert.ok(nodePrimitives.aesSectors!('xts', randomBytes(64, 1)));
  assert.equal(nodePrimitives.aesSectors!('xts', randomBytes(48, 1)), undefined);
  const same = new Uint8Array(64).fill(7);
  assert.equal(nodePrimitives.aesSectors!('xts', same), undefined);
  // Such keys still work, through the fallback (OpenSSL would refuse them).
  const data = randomBytes(2 * 512, 2);
  const run = sectorRun(nodePrimitives, 'xts', same, 'plain64');
  assert.deepEqual(run(run(data, 5, true), 5, false), data);
  assert.deepEqual(run(data, 5, true), sectorRun(browserPrimitives, 'xts', same, 'plain64')(data, 5, true));
});

test('the addon refuses bad arguments instead of touching memory it was not given', native, () => {
  const addon = hostAddon()!;
  const cipher = addon.aesSectors!(0, randomBytes(16, 1))!;
  const run = addon.aesSectorsRun!;
  const buf = new Uint8Array(2048);
  assert.throws(() => run(cipher, false, buf.subarray(0, 1024), buf.subarray(512, 1536), 0), TypeError, 'partial overlap');
  assert.throws(() => run(cipher, false, buf.subarray(0, 1000), new Uint8Array(1000), 0), TypeError, 'not whole sectors');
  assert.throws(() => run(cipher, false, buf.subarray(0, 1024), new Uint8Array(512), 0), TypeError, 'short output');
  assert.throws(() => run(cipher, false, buf.subarray(0, 1024), new Uint8Array(1024), new Uint8Array(16)), TypeError, 'too few IVs');
  assert.throws(() => run(cipher, false, buf.subarray(0, 1024), new Uint8Array(1024), -1), TypeError, 'negative sector');
  assert.throws(() => run({}, false, buf.subarray(0, 1024), new Uint8Array(1024), 0), TypeError, 'not a cipher');
  assert.throws(() => addon.aesSectors!(2 as 0, randomBytes(16, 1)), TypeError, 'unknown mode');
  assert.equal(addon.aesSectors!(0, randomBytes(20, 1)), undefined, 'no such AES key size');
});

test('legacy AES decrypts in place to what decrypt() returns', async () => {
  const cipher = await legacyAesCipher('secret');
  const data = randomBytes(4 * 512, 8);
  const sealed = await cipher.encrypt(data, 77);
  const copy = sealed.slice();
  await cipher.decryptInPlace!(copy, 77);
  assert.deepEqual(copy, await cipher.decrypt(sealed, 77));
  assert.deepEqual(copy, data);
});
