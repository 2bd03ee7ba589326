/**
 * The LUKS1 partition header (592 bytes, big-endian) as QEMU uses it, and the checks QEMU 7.2
 * applies before trusting it (same rules, same wording where it has one), plus bounds against the
 * area that holds it, so hostile headers fail cleanly before any allocation or PBKDF2 run.
 *
 * Layout: magic "LUKS\xBA\xBE", u16 version, char cipher_name[32], char cipher_mode[32],
 * char hash_spec[32], u32 payload_offset (sectors), u32 key_bytes, u8 mk_digest[20],
 * u8 mk_digest_salt[32], u32 mk_digest_iter, char uuid[40], then 8 key slots of 48 bytes:
 * u32 active, u32 iterations, u8 salt[32], u32 key_material_offset (sectors), u32 stripes.
 */
import { ascii, setU16, setU32, u16, u32 } from '../core/bytes.js';
import { corrupt, unsupported } from '../core/errors.js';
import { HASH_LENGTH, isHashAlg, type HashAlg } from './primitives.js';

export const LUKS_MAGIC = Uint8Array.of(0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe);
export const LUKS_HEADER_SIZE = 592;
export const LUKS_SECTOR = 512;
export const LUKS_SLOT_COUNT = 8;
export const LUKS_STRIPES = 4000;
export const LUKS_SALT_LENGTH = 32;
export const LUKS_DIGEST_LENGTH = 20;
/** Key material starts after the first 4 KiB (the header, rounded up) and is 4 KiB aligned. */
export const LUKS_KEY_MATERIAL_ALIGN = 4096;
export const SLOT_ENABLED = 0x00ac71f3;
export const SLOT_DISABLED = 0x0000dead;

const NAME_LENGTH = 32;
const UUID_LENGTH = 40;
const SLOTS_AT = 208;
const SLOT_SIZE = 48;

export type LuksCipherAlg = 'aes-128' | 'aes-192' | 'aes-256';
export type LuksCipherMode = 'xts' | 'cbc';
export type LuksIvGen = 'plain' | 'plain64' | 'essiv';

export interface LuksKeySlot {
  active: boolean;
  iterations: number;
  salt: Uint8Array;
  /** Byte offset of the key material from the start of the LUKS area (sector field × 512). */
  keyOffset: number;
  stripes: number;
}

/** How the payload (and the key material) is enciphered. */
export interface LuksCipherSpec {
  cipherAlg: LuksCipherAlg;
  cipherMode: LuksCipherMode;
  ivGen: LuksIvGen;
  /** The hash named after ':' in the mode string; only ESSIV uses it. */
  ivGenHash: HashAlg | undefined;
  /**
   * A hash named after a plain or plain64 IV generator that qcow has no implementation of (md5,
   * ripemd160): unused, as by QEMU and dm-crypt, and kept only to write the mode string back as it was.
   */
  unusedIvGenHash?: string;
}

export interface LuksHeader extends LuksCipherSpec {
  /** Hash for PBKDF2 and the anti-forensic splitter. */
  hashAlg: HashAlg;
  /** Master key length in bytes (both halves for XTS). */
  keyBytes: number;
  /** Byte offset of the payload from the start of the LUKS area (sector field × 512). */
  payloadOffset: number;
  masterKeyDigest: Uint8Array;
  masterKeySalt: Uint8Array;
  masterKeyIterations: number;
  uuid: string;
  slots: LuksKeySlot[];
}

const AES_KEY_BYTES: Readonly<Record<number, LuksCipherAlg>> = { 16: 'aes-128', 24: 'aes-192', 32: 'aes-256' };
export const AES_KEY_LENGTH: Readonly<Record<LuksCipherAlg, number>> = { 'aes-128': 16, 'aes-192': 24, 'aes-256': 32 };

/** Bytes of key material one slot holds (key_bytes × stripes). */
export const keyMaterialLength = (keyBytes: number, stripes: number): number => keyBytes * stripes;

function cString(b: Uint8Array, off: number, len: number, field: string): string {
  const bytes = b.subarray(off, off + len);
  const end = bytes.indexOf(0);
  if (end < 0) throw corrupt(`LUKS header ${field} is not NUL terminated`);
  return ascii(bytes.subarray(0, end));
}

function hashByName(name: string, what: string): HashAlg {
  if (!isHashAlg(name)) throw unsupported(`LUKS ${what} ${JSON.stringify(name)} is not supported (sha1, sha224, sha256, sha384, sha512 are)`);
  return name;
}

/** Hashes QEMU knows that qcow does not implement: accepted (and unused) after plain and plain64. */
const UNUSED_IV_HASHES: ReadonlySet<string> = new Set(['md5', 'ripemd160']);

/** The AES variant of a key of `keyBytes` in `mode` (XTS keys hold two AES keys). */
function cipherFor(mode: LuksCipherMode, keyBytes: number, cipherName: string): LuksCipherAlg {
  if (cipherName !== 'aes') throw unsupported(`LUKS cipher ${JSON.stringify(cipherName)} is not supported (only aes is)`);
  const algKeyBytes = mode === 'xts' ? keyBytes / 2 : keyBytes;
  const cipherAlg = AES_KEY_BYTES[algKeyBytes];
  // Node's OpenSSL has no AES-192-XTS; QEMU images never use it by default.
  if (cipherAlg === undefined || (mode === 'xts' && cipherAlg === 'aes-192')) {
    throw unsupported(`LUKS cipher aes-${mode} with a ${keyBytes}-byte key is not supported`);
  }
  return cipherAlg;
}

/** "<mode>-<ivgen>[:<hash>]", e.g. "xts-plain64" or "cbc-essiv:sha256". */
function parseCipherMode(spec: string, keyBytes: number, cipherName: string): LuksCipherSpec {
  const dash = spec.indexOf('-');
  if (dash < 0) throw corrupt(`Unexpected LUKS cipher mode string format ${JSON.stringify(spec)}`);
  const mode = spec.slice(0, dash);
  const rest = spec.slice(dash + 1);
  const colon = rest.indexOf(':');
  const ivName = colon < 0 ? rest : rest.slice(0, colon);
  const ivHashName = colon < 0 ? undefined : rest.slice(colon + 1);
  if (mode !== 'xts' && mode !== 'cbc') throw unsupported(`LUKS cipher mode ${JSON.stringify(mode)} is not supported (xts and cbc are)`);
  if (ivName !== 'plain' && ivName !== 'plain64' && ivName !== 'essiv') throw unsupported(`LUKS IV generator ${JSON.stringify(ivName)} is not supported (plain, plain64, essiv are)`);
  const cipherAlg = cipherFor(mode, keyBytes, cipherName);
  // A hash after plain/plain64 is parsed and ignored, as dm-crypt and QEMU do: QEMU's other hash
  // names are accepted there too (206 makes cbc-plain64:md5), unused.
  if (ivName !== 'essiv' && ivHashName !== undefined && UNUSED_IV_HASHES.has(ivHashName)) {
    return { cipherAlg, cipherMode: mode, ivGen: ivName, ivGenHash: undefined, unusedIvGenHash: ivHashName };
  }
  const ivGenHash = ivHashName === undefined ? undefined : hashByName(ivHashName, 'IV generator hash');
  if (ivName === 'essiv') {
    if (ivGenHash === undefined) throw corrupt('LUKS header is missing the ESSIV hash specification');
    // ESSIV enciphers the sector number with AES keyed by hash(master key): the digest must be an AES key size.
    if (AES_KEY_BYTES[HASH_LENGTH[ivGenHash]] === undefined) throw unsupported(`LUKS ESSIV with ${ivGenHash} is not supported (no AES key of ${HASH_LENGTH[ivGenHash]} bytes)`);
  }
  return { cipherAlg, cipherMode: mode, ivGen: ivName, ivGenHash };
}

export interface ParseLuksOptions {
  /** Refuse PBKDF2 iteration counts above this (hostile headers); default MAX_PBKDF2_ITERATIONS. */
  maxIterations?: number;
}

/**
 * No legitimate image needs more: QEMU's default 2 s iter-time gives a few million. 100 million
 * PBKDF2 rounds already take tens of seconds, so a header asking for more is treated as hostile.
 */
export const MAX_PBKDF2_ITERATIONS = 100_000_000;

/**
 * Decode and validate a LUKS1 header. `bytes` starts at the LUKS area; `areaLength` is the whole
 * area's length (the qcow2 FDE extension's length), against which the key material of every
 * active slot is bounds-checked; it defaults to bytes.length.
 */
export function parseLuksHeader(bytes: Uint8Array, areaLength = bytes.length, options: ParseLuksOptions = {}): LuksHeader {
  const maxIterations = options.maxIterations ?? MAX_PBKDF2_ITERATIONS;
  if (bytes.length < LUKS_HEADER_SIZE) throw corrupt(`LUKS header needs ${LUKS_HEADER_SIZE} bytes, the area has ${bytes.length}`);
  if (!LUKS_MAGIC.every((v, i) => bytes[i] === v)) throw corrupt('Volume is not in LUKS format (bad LUKS magic)');
  const version = u16(bytes, 6);
  if (version !== 1) throw unsupported(`LUKS version ${version} is not supported`);
  const cipherName = cString(bytes, 8, NAME_LENGTH, 'cipher name');
  const modeSpec = cString(bytes, 40, NAME_LENGTH, 'cipher mode');
  const hashSpec = cString(bytes, 72, NAME_LENGTH, 'hash spec');
  const payloadSectors = u32(bytes, 104);
  const keyBytes = u32(bytes, 108);
  const spec = parseCipherMode(modeSpec, keyBytes, cipherName);
  const hashAlg = hashByName(hashSpec, 'hash algorithm');
  const masterKeyIterations = u32(bytes, 164);
  const headerSectors = LUKS_KEY_MATERIAL_ALIGN / LUKS_SECTOR;
  if (payloadSectors < headerSectors) throw corrupt('LUKS payload is overlapping with the header');
  if (masterKeyIterations === 0) throw corrupt('LUKS key iteration count is zero');
  if (masterKeyIterations > maxIterations) throw unsupported(`LUKS master key iteration count ${masterKeyIterations} is above the limit of ${maxIterations}`);

  const slots: LuksKeySlot[] = [];
  const extents: [number, number][] = [];
  for (let i = 0; i < LUKS_SLOT_COUNT; i++) {
    const at = SLOTS_AT + i * SLOT_SIZE;
    const state = u32(bytes, at);
    const iterations = u32(bytes, at + 4);
    const offsetSectors = u32(bytes, at + 40);
    const stripes = u32(bytes, at + 44);
    // QEMU accepts exactly 4000 stripes, which also bounds the key material at 256000 bytes.
    if (stripes !== LUKS_STRIPES) throw corrupt(`Keyslot ${i} is corrupted (stripes ${stripes} != ${LUKS_STRIPES})`);
    if (state !== SLOT_ENABLED && state !== SLOT_DISABLED) throw corrupt(`Keyslot ${i} state (active/disable) is corrupted`);
    const active = state === SLOT_ENABLED;
    if (active && iterations === 0) throw corrupt(`Keyslot ${i} iteration count is zero`);
    if (active && iterations > maxIterations) throw unsupported(`Keyslot ${i} iteration count ${iterations} is above the limit of ${maxIterations}`);
    const lengthSectors = Math.ceil(keyMaterialLength(keyBytes, stripes) / LUKS_SECTOR);
    if (offsetSectors < headerSectors) throw corrupt(`Keyslot ${i} is overlapping with the LUKS header`);
    if (offsetSectors + lengthSectors > payloadSectors) throw corrupt(`Keyslot ${i} is overlapping with the encrypted payload`);
    for (const [j, [start, end]] of extents.entries()) {
      if (offsetSectors < end && start < offsetSectors + lengthSectors) throw corrupt(`Keyslots ${j} and ${i} are overlapping in the header`);
    }
    extents.push([offsetSectors, offsetSectors + lengthSectors]);
    const keyOffset = offsetSectors * LUKS_SECTOR;
    if (active && keyOffset + keyMaterialLength(keyBytes, stripes) > areaLength) {
      throw corrupt(`Keyslot ${i} key material [0x${keyOffset.toString(16)}, +0x${keyMaterialLength(keyBytes, stripes).toString(16)}) is outside the 0x${areaLength.toString(16)}-byte LUKS area`);
    }
    slots.push({ active, iterations, salt: bytes.slice(at + 8, at + 40), keyOffset, stripes });
  }
  return {
    ...spec,
    hashAlg,
    keyBytes,
    payloadOffset: payloadSectors * LUKS_SECTOR,
    masterKeyDigest: bytes.slice(112, 132),
    masterKeySalt: bytes.slice(132, 164),
    masterKeyIterations,
    uuid: cStringLenient(bytes.subarray(168, 168 + UUID_LENGTH)),
    slots,
  };
}

/** The UUID field need not be NUL terminated (QEMU copies at most 40 bytes). */
function cStringLenient(b: Uint8Array): string {
  const end = b.indexOf(0);
  return ascii(end < 0 ? b : b.subarray(0, end));
}

/** The mode string QEMU writes: "<mode>-<ivgen>" or "<mode>-<ivgen>:<hash>". */
export function cipherModeSpec(spec: LuksCipherSpec): string {
  const hash = spec.ivGenHash ?? spec.unusedIvGenHash;
  return hash === undefined ? `${spec.cipherMode}-${spec.ivGen}` : `${spec.cipherMode}-${spec.ivGen}:${hash}`;
}

function putString(b: Uint8Array, off: number, len: number, s: string): void {
  const bytes = new TextEncoder().encode(s);
  if (bytes.length >= len) throw new RangeError(`"${s}" does not fit a ${len}-byte LUKS field`);
  b.set(bytes, off);
}

/** Encode a header into its 592 bytes. */
export function encodeLuksHeader(h: LuksHeader): Uint8Array {
  const b = new Uint8Array(LUKS_HEADER_SIZE);
  b.set(LUKS_MAGIC, 0);
  setU16(b, 6, 1);
  putString(b, 8, NAME_LENGTH, 'aes');
  putString(b, 40, NAME_LENGTH, cipherModeSpec(h));
  putString(b, 72, NAME_LENGTH, h.hashAlg);
  setU32(b, 104, h.payloadOffset / LUKS_SECTOR);
  setU32(b, 108, h.keyBytes);
  b.set(h.masterKeyDigest, 112);
  b.set(h.masterKeySalt, 132);
  setU32(b, 164, h.masterKeyIterations);
  putString(b, 168, UUID_LENGTH, h.uuid);
  h.slots.forEach((s, i) => {
    const at = SLOTS_AT + i * SLOT_SIZE;
    setU32(b, at, s.active ? SLOT_ENABLED : SLOT_DISABLED);
    setU32(b, at + 4, s.iterations);
    b.set(s.salt, at + 8);
    setU32(b, at + 40, s.keyOffset / LUKS_SECTOR);
    setU32(b, at + 44, s.stripes);
  });
  return b;
}
