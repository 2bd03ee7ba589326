/**
 * Interop with qemu-img 7.2: we unlock and decrypt LUKS qcow2 images QEMU made, and QEMU unlocks
 * and reads LUKS areas we made. The qcow2 walk here is a tiny test helper (FDE extension, L1, L2)
 * so these tests depend on nothing but the crypto layer.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createLuks, luksEncryptInfo, parseLuksHeader, unlockLuks } from '#src/crypto/luks.js';
import { primitives as browserPrimitives } from '#src/crypto/index.browser.js';
import { luksSectorCipher } from '#src/crypto/luks-cipher.js';
import { needs, run, runOk, scratch } from '../support/qemu.js';

const SECRET = ['--object', 'secret,id=sec0,data=hunter2'];

/** A pattern that differs in every sector, so a wrong sector number cannot go unnoticed. */
function pattern(size: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i * 7 + (i >> 9)) & 0xff;
  return b;
}

interface Qcow2Bits {
  file: Uint8Array;
  area: Uint8Array;
  /** Host offset of the data cluster that maps guest offset 0. */
  firstDataCluster: number;
  clusterSize: number;
}

function walkQcow2(file: Uint8Array): Qcow2Bits {
  const v = new DataView(file.buffer, file.byteOffset, file.byteLength);
  assert.equal(v.getUint32(0), 0x514649fb, 'qcow2 magic');
  assert.equal(v.getUint32(32), 2, 'crypt_method 2 = LUKS');
  const clusterSize = 2 ** v.getUint32(20);
  let p = v.getUint32(100); // v3 header_length: extensions follow the header
  let area: Uint8Array | undefined;
  for (;;) {
    const type = v.getUint32(p);
    const len = v.getUint32(p + 4);
    if (type === 0) break;
    if (type === 0x0537be77) {
      const offset = Number(v.getBigUint64(p + 8));
      const length = Number(v.getBigUint64(p + 16));
      area = file.subarray(offset, offset + length);
    }
    p += 8 + Math.ceil(len / 8) * 8;
  }
  assert.ok(area, 'FDE header extension 0x0537BE77');
  const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
  const l1 = Number(v.getBigUint64(40));
  const l2 = Number(v.getBigUint64(l1) & OFFSET_MASK);
  const firstDataCluster = Number(v.getBigUint64(l2) & OFFSET_MASK);
  assert.ok(firstDataCluster > 0, 'guest cluster 0 is allocated');
  return { file, area, firstDataCluster, clusterSize };
}

const cases = [
  { name: 'default aes-256-xts-plain64/sha256', opts: '', iterTime: 10, info: { 'cipher-alg': 'aes-256', 'cipher-mode': 'xts', 'ivgen-alg': 'plain64', 'hash-alg': 'sha256' } },
  // sha1 PBKDF2 is so fast that qemu cannot time 10 ms reliably; 100 ms it can.
  { name: 'aes-128-cbc-essiv:sha256/sha1', opts: ',encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1', iterTime: 100, info: { 'cipher-alg': 'aes-128', 'cipher-mode': 'cbc', 'ivgen-alg': 'essiv', 'ivgen-hash-alg': 'sha256', 'hash-alg': 'sha1' } },
];

for (const c of cases) {
  test(`unlocks a qemu-made LUKS qcow2 (${c.name}) and decrypts a cluster with host-sector IVs`, needs('qemu-img'), async (t) => {
    const dir = await scratch(t);
    const src = join(dir, 'src.raw');
    const img = join(dir, 'x.qcow2');
    const plain = pattern(1 << 20);
    await writeFile(src, plain);
    await runOk('qemu-img', ['convert', '-O', 'qcow2', ...SECRET, '-o', `encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=${c.iterTime}${c.opts}`, src, img]);
    const q = walkQcow2(new Uint8Array(await readFile(img)));
    const header = parseLuksHeader(q.area, q.area.length);
    const readArea = async (offset: number, length: number) => q.area.slice(offset, offset + length);

    // Our info object is exactly what qemu-img prints, key order included.
    const qemuInfo = JSON.parse((await runOk('qemu-img', ['info', '--output=json', img])).stdout);
    assert.equal(JSON.stringify(luksEncryptInfo(header)), JSON.stringify(qemuInfo['format-specific'].data.encrypt));
    for (const [k, v] of Object.entries(c.info)) assert.equal((luksEncryptInfo(header) as unknown as Record<string, unknown>)[k], v, k);

    const ciphertext = q.file.slice(q.firstDataCluster, q.firstDataCluster + q.clusterSize);
    const hostSector = q.firstDataCluster / 512;
    const { cipher, masterKey } = await unlockLuks(header, readArea, 'hunter2');
    const decrypted = await cipher.decrypt(ciphertext, hostSector);
    assert.deepEqual(decrypted, plain.subarray(0, q.clusterSize));
    assert.deepEqual(await cipher.encrypt(decrypted, hostSector), ciphertext);
    // The browser primitives decipher the payload the same way (their PBKDF2 is tested elsewhere;
    // running it here at qemu's iteration counts would only make the test slow).
    const browserCipher = luksSectorCipher(browserPrimitives, header, masterKey);
    assert.deepEqual(await browserCipher.decrypt(ciphertext, hostSector), decrypted);
    await assert.rejects(unlockLuks(header, readArea, 'hunter3'), { code: 'QCOW_BAD_PASSWORD', message: 'Invalid password, cannot unlock any keyslot' });
  });
}

for (const options of [{}, { cipherAlg: 'aes-128', cipherMode: 'cbc', ivGen: 'essiv', hashAlg: 'sha512' }] as const) {
  test(`qemu unlocks and reads a LUKS area we created, and reports our info object: ${JSON.stringify(options)}`, needs('qemu-img'), async (t) => {
    // A raw LUKS volume (qemu's "luks" driver) is the area followed by the payload, whose sector
    // numbers count from the payload start: the same header and ciphers qcow2 embeds.
    const dir = await scratch(t);
    const vol = join(dir, 'ours.luks');
    const out = join(dir, 'out.raw');
    const created = await createLuks('hunter2', { ...options, iterTimeMs: 10 });
    const plain = pattern(256 * 1024);
    await writeFile(vol, Buffer.concat([created.area, await created.cipher.encrypt(plain, 0)]));
    const open = ['--image-opts', `driver=luks,key-secret=sec0,file.filename=${vol}`];
    await runOk('qemu-img', ['convert', ...SECRET, ...open, '-O', 'raw', out]);
    assert.deepEqual(new Uint8Array(await readFile(out)), plain);
    const qemuInfo = JSON.parse((await runOk('qemu-img', ['info', '--output=json', vol])).stdout);
    // The luks driver prints the same object as qcow2's "encrypt", minus qcow2's "format" key.
    const { format, ...ours } = luksEncryptInfo(created.header);
    assert.equal(format, 'luks');
    assert.equal(JSON.stringify(qemuInfo['format-specific'].data), JSON.stringify(ours));
    const wrong = await run('qemu-img', ['convert', '--object', 'secret,id=sec0,data=hunter3', ...open, '-O', 'raw', out]);
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stderr, /Invalid password, cannot unlock any keyslot/);
  });
}
