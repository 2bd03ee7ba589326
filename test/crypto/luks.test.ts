/**
 * LUKS1 as QEMU embeds it in qcow2: areas we create unlock again (in both runtimes' primitives),
 * match QEMU's layout and info output, and hostile headers fail cleanly before any real work.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createLuks, luksEncryptInfo, parseLuksHeader, unlockLuks, MAX_PBKDF2_ITERATIONS, type CreateLuksOptions } from '#src/crypto/luks.js';
import { primitives as browserPrimitives } from '#src/crypto/index.browser.js';
import { randomBytes } from '../support/qemu.js';

const readFrom = (area: Uint8Array) => async (offset: number, length: number) => area.slice(offset, offset + length);

test('a default area has QEMU\'s layout: aes-256-xts-plain64/sha256, 0x1F9000 bytes, slots 4 KiB aligned', async () => {
  const { area, header } = await createLuks('hunter2', { iterTimeMs: 10 });
  assert.equal(area.length, 0x1f9000);
  const text = new TextDecoder('latin1').decode(area.subarray(0, 104));
  assert.ok(text.startsWith('LUKS\xba\xbe\x00\x01aes\x00'));
  assert.ok(text.includes('xts-plain64\x00') && text.includes('sha256\x00'));
  const info = luksEncryptInfo(parseLuksHeader(area));
  assert.deepEqual(Object.keys(info), ['ivgen-alg', 'hash-alg', 'cipher-alg', 'uuid', 'format', 'cipher-mode', 'slots', 'payload-offset', 'master-key-iters']);
  assert.equal(info['payload-offset'], 2068480);
  assert.deepEqual(
    info.slots.map((s) => s['key-offset']),
    [4096, 262144, 520192, 778240, 1036288, 1294336, 1552384, 1810432],
  );
  assert.deepEqual(info.slots[0], { active: true, iters: header.slots[0]!.iterations, 'key-offset': 4096, stripes: 4000 });
  assert.deepEqual(info.slots[1], { active: false, 'key-offset': 262144 });
  assert.match(info.uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  // QEMU's floors: at least 1000 iterations for the slot and for the master-key digest.
  assert.ok(info['master-key-iters'] >= 1000 && info.slots[0]!.iters! >= 1000);
  // Unused slots are zeros, as QEMU leaves them.
  assert.ok(area.subarray(262144).every((b) => b === 0));
});

const variants: CreateLuksOptions[] = [
  {},
  { cipherAlg: 'aes-128', cipherMode: 'xts' },
  { cipherAlg: 'aes-128', cipherMode: 'cbc', ivGen: 'essiv', hashAlg: 'sha1' },
  { cipherAlg: 'aes-256', cipherMode: 'cbc', ivGen: 'plain64', hashAlg: 'sha512' },
];

for (const options of variants) {
  test(`create then unlock round-trips, in Node and browser primitives alike: ${JSON.stringify(options)}`, async () => {
    const created = await createLuks('pässword', { ...options, iterTimeMs: 10 });
    const header = parseLuksHeader(created.area);
    const payload = randomBytes(4 * 512, 21);
    const hostSector = 0x12345; // qcow2 passes host offset / 512
    const enc = await created.cipher.encrypt(payload, hostSector);
    assert.notDeepEqual(enc, payload);
    for (const primitives of [undefined, browserPrimitives]) {
      const unlocked = await unlockLuks(header, readFrom(created.area), 'pässword', { primitives });
      assert.equal(unlocked.slot, 0);
      assert.deepEqual(unlocked.masterKey, created.masterKey);
      assert.deepEqual(await unlocked.cipher.decrypt(enc, hostSector), payload);
      assert.deepEqual(await unlocked.cipher.encrypt(payload, hostSector), enc);
    }
    await assert.rejects(unlockLuks(header, readFrom(created.area), 'password'), {
      code: 'QCOW_BAD_PASSWORD',
      message: 'Invalid password, cannot unlock any keyslot',
    });
  });
}

test('an area made with the browser primitives unlocks with the Node ones', async () => {
  const created = await createLuks('hunter2', { iterTimeMs: 10, primitives: browserPrimitives });
  const unlocked = await unlockLuks(parseLuksHeader(created.area), readFrom(created.area), 'hunter2');
  assert.deepEqual(unlocked.masterKey, created.masterKey);
});

test('ESSIV images list their IV hash in the info object, after the uuid like QEMU', async () => {
  const { area } = await createLuks('x', { iterTimeMs: 10, cipherAlg: 'aes-128', cipherMode: 'cbc', ivGen: 'essiv' });
  const info = luksEncryptInfo(parseLuksHeader(area));
  assert.equal(info['ivgen-hash-alg'], 'sha256');
  assert.deepEqual(Object.keys(info).slice(3, 6), ['uuid', 'ivgen-hash-alg', 'format']);
  // 16-byte key: 64000 bytes of key material per slot, rounded up to 4 KiB = 65536; qemu-img made
  // the same 0x81000-byte area for these options.
  assert.equal(area.length, 0x81000);
});

test('bad options are refused before any work', async () => {
  await assert.rejects(createLuks('x', { iterTimeMs: 0 }), { code: 'QCOW_INVALID_ARGUMENT' });
  await assert.rejects(createLuks('x', { cipherMode: 'ecb' as 'cbc' }), { code: 'QCOW_INVALID_ARGUMENT' });
});

// ---- hostile headers -------------------------------------------------------------------------

let template: Uint8Array | undefined;
async function validArea(): Promise<Uint8Array> {
  template ??= (await createLuks('hunter2', { iterTimeMs: 10 })).area;
  return template.slice();
}
const SLOT = (i: number) => 208 + 48 * i;
const put32 = (b: Uint8Array, off: number, v: number) => new DataView(b.buffer, b.byteOffset).setUint32(off, v);

async function assertRefused(mutate: (a: Uint8Array) => void, code: string, message: RegExp, areaLength?: number): Promise<void> {
  const area = await validArea();
  mutate(area);
  assert.throws(() => parseLuksHeader(area, areaLength ?? area.length), (e: unknown) => {
    assert.equal((e as { code: string }).code, code);
    assert.match((e as Error).message, message);
    return true;
  });
}

test('hostile: wrong magic, wrong version, truncated header', async () => {
  await assertRefused((a) => (a[0] = 0x6c), 'QCOW_CORRUPT', /not in LUKS format/);
  await assertRefused((a) => (a[7] = 2), 'QCOW_UNSUPPORTED', /LUKS version 2/);
  assert.throws(() => parseLuksHeader(new Uint8Array(100)), { code: 'QCOW_CORRUPT' });
});

test('hostile: unterminated or unknown algorithm names', async () => {
  await assertRefused((a) => a.fill(0x41, 8, 40), 'QCOW_CORRUPT', /cipher name is not NUL terminated/);
  await assertRefused((a) => a.set(new TextEncoder().encode('twofish\0'), 8), 'QCOW_UNSUPPORTED', /twofish/);
  await assertRefused((a) => a.set(new TextEncoder().encode('ecb\0'), 40), 'QCOW_CORRUPT', /cipher mode string/);
  await assertRefused((a) => a.set(new TextEncoder().encode('md5\0'), 72), 'QCOW_UNSUPPORTED', /md5/);
  await assertRefused((a) => put32(a, 108, 48), 'QCOW_UNSUPPORTED', /48-byte key/);
  await assertRefused((a) => put32(a, 108, 7), 'QCOW_UNSUPPORTED', /7-byte key/);
});

test('hostile: stripes 0 or huge are refused before allocating key material', async () => {
  await assertRefused((a) => put32(a, SLOT(0) + 44, 0), 'QCOW_CORRUPT', /Keyslot 0 is corrupted \(stripes 0 != 4000\)/);
  await assertRefused((a) => put32(a, SLOT(3) + 44, 0xffffffff), 'QCOW_CORRUPT', /Keyslot 3 is corrupted/);
});

test('hostile: key slot offsets outside the area, over the header, payload or each other', async () => {
  await assertRefused((a) => put32(a, SLOT(0) + 40, 0xfffffff0), 'QCOW_CORRUPT', /Keyslot 0 is overlapping with the encrypted payload/);
  await assertRefused((a) => put32(a, SLOT(0) + 40, 1), 'QCOW_CORRUPT', /Keyslot 0 is overlapping with the LUKS header/);
  await assertRefused((a) => put32(a, SLOT(2) + 40, 8), 'QCOW_CORRUPT', /Keyslots 0 and 2 are overlapping/);
  await assertRefused((a) => put32(a, 104, 4), 'QCOW_CORRUPT', /payload is overlapping with the header/);
  // A payload offset pointing past the real area: the active slot's material is then checked against the area.
  await assertRefused((a) => put32(a, 104, 0xffffffff), 'QCOW_CORRUPT', /outside the 0x1000-byte LUKS area/, 0x1000);
  await assertRefused((a) => put32(a, SLOT(1), 0x1234), 'QCOW_CORRUPT', /Keyslot 1 state/);
});

test('hostile: iteration counts of zero or absurd size (cap MAX_PBKDF2_ITERATIONS) are refused without running PBKDF2', async () => {
  assert.equal(MAX_PBKDF2_ITERATIONS, 100_000_000);
  await assertRefused((a) => put32(a, 164, 0), 'QCOW_CORRUPT', /key iteration count is zero/);
  await assertRefused((a) => put32(a, 164, 0xffffffff), 'QCOW_UNSUPPORTED', /master key iteration count 4294967295 is above/);
  await assertRefused((a) => put32(a, SLOT(0) + 4, 0), 'QCOW_CORRUPT', /Keyslot 0 iteration count is zero/);
  await assertRefused((a) => put32(a, SLOT(0) + 4, 0xffffffff), 'QCOW_UNSUPPORTED', /Keyslot 0 iteration count 4294967295/);
  // The cap is an option for people who really have such images.
  const area = await validArea();
  put32(area, SLOT(0) + 4, 200_000_000);
  assert.equal(parseLuksHeader(area, area.length, { maxIterations: 2 ** 32 }).slots[0]!.iterations, 200_000_000);
});

test('hostile: a short read of key material is an error, not a crash', async () => {
  const area = await validArea();
  const header = parseLuksHeader(area);
  await assert.rejects(unlockLuks(header, async () => new Uint8Array(10), 'hunter2'), { code: 'QCOW_CORRUPT', message: /short read/ });
});
