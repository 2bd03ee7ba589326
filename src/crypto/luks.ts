/**
 * LUKS1 encryption as QEMU embeds it in QCOW2 (crypt_method 2). The qcow2 header extension
 * 0x0537BE77 points at a cluster-aligned "area" holding a LUKS1 header and key material; every
 * offset inside the header counts from the start of that area. Payload sectors are enciphered
 * with the HOST sector number (host offset / 512) as IV/tweak.
 *
 * API:
 * - parseLuksHeader(areaBytes, areaLength?, { maxIterations? }) → LuksHeader. Validates like
 *   QEMU 7.2 (magic, version 1, NUL-terminated names, stripes == 4000, slot states, slot overlap
 *   with header/payload/each other) plus: supported algorithms only (aes-128/192/256 cbc, aes-128/256
 *   xts; plain, plain64, essiv:sha256; sha1/224/256/384/512), active key material inside the area,
 *   PBKDF2 iterations ≤ MAX_PBKDF2_ITERATIONS (100 million) so hostile headers cannot stall us.
 *   Errors: QcowError QCOW_CORRUPT (contradicts LUKS) or QCOW_UNSUPPORTED.
 * - unlockLuks(header, readArea, password, { primitives? }) → { cipher, masterKey, slot }. Tries every active slot
 *   (PBKDF2 → decrypt key material → AF-merge → check the master-key digest). A wrong password
 *   throws QcowError('QCOW_BAD_PASSWORD', 'Invalid password, cannot unlock any keyslot').
 * - createLuks(password, options) → { area, header, cipher, masterKey }: a new area laid out as
 *   QEMU lays it out (slot 0 active, 4000 stripes, 4 KiB aligned slots; 0x1F9000 bytes for the
 *   default aes-256-xts-plain64/sha256), iteration counts calibrated to options.iterTimeMs.
 * - luksEncryptInfo(header) → the object `qemu-img info --output=json` prints under
 *   format-specific.data.encrypt, with QEMU's keys in QEMU's order.
 */
import { QcowError, invalidArgument } from '../core/errors.js';
import { encodeUtf8 } from '../core/bytes.js';
import { primitives as platformPrimitives } from '#crypto';
import { afMerge, afSplit } from './af-split.js';
import { luksSectorCipher } from './luks-cipher.js';
import {
  AES_KEY_LENGTH,
  LUKS_DIGEST_LENGTH,
  LUKS_KEY_MATERIAL_ALIGN,
  LUKS_SALT_LENGTH,
  LUKS_SECTOR,
  LUKS_SLOT_COUNT,
  LUKS_STRIPES,
  encodeLuksHeader,
  keyMaterialLength,
  type LuksCipherAlg,
  type LuksCipherMode,
  type LuksHeader,
  type LuksIvGen,
  type LuksKeySlot,
} from './luks-header.js';
import { randomBytes, type CryptoPrimitives, type HashAlg } from './primitives.js';
import type { SectorCipher } from './types.js';

export { parseLuksHeader, MAX_PBKDF2_ITERATIONS } from './luks-header.js';
export type { LuksHeader, LuksKeySlot, LuksCipherAlg, LuksCipherMode, LuksIvGen, ParseLuksOptions } from './luks-header.js';

/** QEMU's floor for both iteration counts, whatever the calibration says. */
const MIN_ITERATIONS = 1000;

/** Reads `length` bytes at `offset` from the start of the LUKS area. */
export type ReadLuksArea = (offset: number, length: number) => Promise<Uint8Array>;

export interface LuksUnlocked {
  /** Payload cipher: pass the host sector number (host offset / 512). */
  cipher: SectorCipher;
  masterKey: Uint8Array;
  /** Index of the key slot the password opened. */
  slot: number;
}

/** For tests: run with another primitives implementation (e.g. the browser one under Node). */
export interface LuksImplOptions {
  primitives?: CryptoPrimitives;
}

/** Whole sectors holding `bytes` followed by zeros: the sector ciphers work on whole sectors. */
function padToSectors(bytes: Uint8Array): Uint8Array {
  const out = new Uint8Array(Math.ceil(bytes.length / LUKS_SECTOR) * LUKS_SECTOR);
  out.set(bytes);
  return out;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}

async function masterKeyDigest(prims: CryptoPrimitives, h: LuksHeader, masterKey: Uint8Array): Promise<Uint8Array> {
  return prims.pbkdf2(h.hashAlg, masterKey, h.masterKeySalt, h.masterKeyIterations, LUKS_DIGEST_LENGTH);
}

/** The master key that `pw` opens key slot `index` with, or undefined when it does not open it. */
async function unlockSlot(prims: CryptoPrimitives, header: LuksHeader, index: number, readArea: ReadLuksArea, pw: Uint8Array): Promise<Uint8Array | undefined> {
  const slot = header.slots[index]!;
  const slotKey = await prims.pbkdf2(header.hashAlg, pw, slot.salt, slot.iterations, header.keyBytes);
  const length = keyMaterialLength(header.keyBytes, slot.stripes);
  const material = await readArea(slot.keyOffset, length);
  if (material.length !== length) throw new QcowError('QCOW_CORRUPT', `key slot ${index}: short read of LUKS key material (${material.length} of ${length} bytes)`);
  // CBC and XTS decryption of a prefix does not depend on what follows, so zero padding is harmless.
  const split = luksSectorCipher(prims, header, slotKey).decryptSync(padToSectors(material), 0);
  const candidate = afMerge(prims, header.hashAlg, split, header.keyBytes, slot.stripes);
  return equalBytes(await masterKeyDigest(prims, header, candidate), header.masterKeyDigest) ? candidate : undefined;
}

export async function unlockLuks(header: LuksHeader, readArea: ReadLuksArea, password: string, options: LuksImplOptions = {}): Promise<LuksUnlocked> {
  const prims = options.primitives ?? platformPrimitives;
  const pw = encodeUtf8(password);
  for (const [index, slot] of header.slots.entries()) {
    if (!slot.active) continue;
    const masterKey = await unlockSlot(prims, header, index, readArea, pw);
    if (masterKey) return { cipher: luksSectorCipher(prims, header, masterKey), masterKey, slot: index };
  }
  throw new QcowError('QCOW_BAD_PASSWORD', 'Invalid password, cannot unlock any keyslot');
}

/** The active key slots `password` opens (all of them, where unlockLuks stops at the first). */
export async function luksSlotsOpenedBy(header: LuksHeader, readArea: ReadLuksArea, password: string, options: LuksImplOptions = {}): Promise<number[]> {
  const prims = options.primitives ?? platformPrimitives;
  const pw = encodeUtf8(password);
  const out: number[] = [];
  for (const [index, slot] of header.slots.entries()) if (slot.active && (await unlockSlot(prims, header, index, readArea, pw))) out.push(index);
  return out;
}

/**
 * Key slot `index` made to open `masterKey` with `password` (PBKDF2 calibrated to `iterTimeMs`):
 * the new slot and its key material, to be written at the slot's key offset.
 */
export async function luksKeySlot(
  header: LuksHeader,
  index: number,
  masterKey: Uint8Array,
  password: string,
  iterTimeMs = 2000,
  options: LuksImplOptions = {},
): Promise<{ slot: LuksKeySlot; material: Uint8Array }> {
  const prims = options.primitives ?? platformPrimitives;
  const pw = encodeUtf8(password);
  const salt = randomBytes(LUKS_SALT_LENGTH);
  const rate = await pbkdf2IterationsPerSecond(prims, header.hashAlg, pw, salt, header.keyBytes, Math.min(Math.max(iterTimeMs, 20), 250));
  const iterations = Math.max(Math.floor((rate * iterTimeMs) / 1000), MIN_ITERATIONS);
  if (iterations > 0xffff_ffff) throw invalidArgument(`LUKS iter-time ${iterTimeMs} ms needs more than 2^32 PBKDF2 iterations`);
  const old = header.slots[index]!;
  const slotKey = await prims.pbkdf2(header.hashAlg, pw, salt, iterations, header.keyBytes);
  const split = afSplit(prims, header.hashAlg, masterKey, old.stripes);
  const material = luksSectorCipher(prims, header, slotKey).encryptSync(padToSectors(split), 0).subarray(0, keyMaterialLength(header.keyBytes, old.stripes));
  return { slot: { active: true, iterations, salt, keyOffset: old.keyOffset, stripes: old.stripes }, material };
}

export interface CreateLuksOptions extends LuksImplOptions {
  cipherAlg?: 'aes-128' | 'aes-256';
  cipherMode?: LuksCipherMode;
  ivGen?: 'plain64' | 'essiv';
  /** ESSIV's hash; only sha256 gives an AES key size. Default sha256. */
  ivGenHashAlg?: 'sha256';
  hashAlg?: 'sha256' | 'sha1' | 'sha512';
  /** Milliseconds of PBKDF2 a slot unlock should cost, like QEMU's encrypt.iter-time. Default 2000. */
  iterTimeMs?: number;
}

export interface CreatedLuks {
  /** The whole area: header, key material, zeros for unused slots. Length = header.payloadOffset. */
  area: Uint8Array;
  header: LuksHeader;
  cipher: SectorCipher;
  masterKey: Uint8Array;
}

/**
 * PBKDF2 iterations per second for these inputs, measured on the wall clock like QEMU measures on
 * the CPU clock: grow the count until one run takes at least `sampleMs`.
 */
async function pbkdf2IterationsPerSecond(prims: CryptoPrimitives, alg: HashAlg, password: Uint8Array, salt: Uint8Array, keyLength: number, sampleMs: number): Promise<number> {
  let iterations = 1 << 12;
  for (;;) {
    const start = performance.now();
    await prims.pbkdf2(alg, password, salt, iterations, keyLength);
    const elapsed = performance.now() - start;
    if (elapsed >= sampleMs || iterations >= 1 << 30) return (iterations * 1000) / Math.max(elapsed, 0.001);
    iterations = elapsed < sampleMs / 10 ? iterations * 10 : Math.ceil((iterations * sampleMs * 1.2) / Math.max(elapsed, 0.001));
  }
}

function uuidV4(): string {
  const b = randomBytes(16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export async function createLuks(password: string, options: CreateLuksOptions = {}): Promise<CreatedLuks> {
  const prims = options.primitives ?? platformPrimitives;
  const cipherAlg: LuksCipherAlg = options.cipherAlg ?? 'aes-256';
  const cipherMode = options.cipherMode ?? 'xts';
  const ivGen: LuksIvGen = options.ivGen ?? 'plain64';
  const hashAlg = options.hashAlg ?? 'sha256';
  const iterTimeMs = options.iterTimeMs ?? 2000;
  if (!(cipherAlg in AES_KEY_LENGTH) || (cipherMode !== 'xts' && cipherMode !== 'cbc') || (ivGen !== 'plain64' && ivGen !== 'essiv') || !['sha1', 'sha256', 'sha512'].includes(hashAlg)) {
    throw invalidArgument(`unsupported LUKS options ${JSON.stringify({ cipherAlg, cipherMode, ivGen, hashAlg })}`);
  }
  if (!Number.isSafeInteger(iterTimeMs) || iterTimeMs <= 0) throw invalidArgument(`LUKS iter-time must be a positive whole number of milliseconds, got ${iterTimeMs}`);
  // QEMU writes the ESSIV hash into the mode string only for essiv.
  const ivGenHash = ivGen === 'essiv' ? (options.ivGenHashAlg ?? 'sha256') : undefined;
  const spec = { cipherAlg, cipherMode, ivGen, ivGenHash };
  const keyBytes = AES_KEY_LENGTH[cipherAlg] * (cipherMode === 'xts' ? 2 : 1);

  // Layout as QEMU (following cryptsetup): slots start after the first 4 KiB; each slot's key
  // material is rounded up to 4 KiB; the payload follows the 8th slot.
  const materialLength = keyMaterialLength(keyBytes, LUKS_STRIPES);
  const slotStride = Math.ceil(materialLength / LUKS_KEY_MATERIAL_ALIGN) * LUKS_KEY_MATERIAL_ALIGN;
  const slotOffset = (i: number) => LUKS_KEY_MATERIAL_ALIGN + i * slotStride;
  const payloadOffset = slotOffset(LUKS_SLOT_COUNT);

  const masterKey = randomBytes(keyBytes);
  const masterKeySalt = randomBytes(LUKS_SALT_LENGTH);
  const sampleMs = Math.min(Math.max(iterTimeMs, 20), 250);
  // Master key digest: 1/8 of the time budget, as QEMU and cryptsetup do.
  const mkRate = await pbkdf2IterationsPerSecond(prims, hashAlg, masterKey, masterKeySalt, LUKS_DIGEST_LENGTH, sampleMs);
  const masterKeyIterations = Math.max(Math.floor(Math.floor((mkRate * iterTimeMs) / 1000) / 8), MIN_ITERATIONS);
  const pw = encodeUtf8(password);
  const slotSalt = randomBytes(LUKS_SALT_LENGTH);
  const slotRate = await pbkdf2IterationsPerSecond(prims, hashAlg, pw, slotSalt, keyBytes, sampleMs);
  const slotIterations = Math.max(Math.floor((slotRate * iterTimeMs) / 1000), MIN_ITERATIONS);
  if (slotIterations > 0xffff_ffff || masterKeyIterations > 0xffff_ffff) throw invalidArgument(`LUKS iter-time ${iterTimeMs} ms needs more than 2^32 PBKDF2 iterations`);

  const header: LuksHeader = {
    ...spec,
    hashAlg,
    keyBytes,
    payloadOffset,
    masterKeyDigest: new Uint8Array(LUKS_DIGEST_LENGTH),
    masterKeySalt,
    masterKeyIterations,
    uuid: uuidV4(),
    slots: Array.from({ length: LUKS_SLOT_COUNT }, (_, i) => ({
      active: i === 0,
      iterations: i === 0 ? slotIterations : 0,
      salt: i === 0 ? slotSalt : new Uint8Array(LUKS_SALT_LENGTH),
      keyOffset: slotOffset(i),
      stripes: LUKS_STRIPES,
    })),
  };
  header.masterKeyDigest = await masterKeyDigest(prims, header, masterKey);

  const slotKey = await prims.pbkdf2(hashAlg, pw, slotSalt, slotIterations, keyBytes);
  const split = afSplit(prims, hashAlg, masterKey, LUKS_STRIPES);
  const material = luksSectorCipher(prims, spec, slotKey).encryptSync(padToSectors(split), 0).subarray(0, materialLength);

  const area = new Uint8Array(payloadOffset);
  area.set(encodeLuksHeader(header), 0);
  area.set(material, slotOffset(0));
  return { area, header, cipher: luksSectorCipher(prims, spec, masterKey), masterKey };
}

export interface LuksSlotInfo {
  active: boolean;
  iters?: number;
  'key-offset': number;
  stripes?: number;
}

/** `qemu-img info --output=json` → format-specific.data.encrypt for a LUKS qcow2. */
export interface LuksEncryptInfo {
  'ivgen-alg': LuksIvGen;
  'hash-alg': HashAlg;
  'cipher-alg': LuksCipherAlg;
  uuid: string;
  'ivgen-hash-alg'?: HashAlg;
  format: 'luks';
  'cipher-mode': LuksCipherMode;
  slots: LuksSlotInfo[];
  'payload-offset': number;
  'master-key-iters': number;
}

/** Keys in the order qemu-img 7.2 prints them; iters/stripes only for active slots. */
export function luksEncryptInfo(h: LuksHeader): LuksEncryptInfo {
  return {
    'ivgen-alg': h.ivGen,
    'hash-alg': h.hashAlg,
    'cipher-alg': h.cipherAlg,
    uuid: h.uuid,
    ...(h.ivGen === 'essiv' && h.ivGenHash !== undefined ? { 'ivgen-hash-alg': h.ivGenHash } : {}),
    format: 'luks',
    'cipher-mode': h.cipherMode,
    slots: h.slots.map((s) =>
      s.active ? { active: true, iters: s.iterations, 'key-offset': s.keyOffset, stripes: s.stripes } : { active: false, 'key-offset': s.keyOffset },
    ),
    'payload-offset': h.payloadOffset,
    'master-key-iters': h.masterKeyIterations,
  };
}
