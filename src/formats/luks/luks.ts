/**
 * LUKS1 images as QEMU's `luks` format driver writes them: the LUKS header and key material at
 * the start of the file, then the payload, every 512-byte sector of it encrypted with the master
 * key and an IV from its guest sector number. The virtual size is what follows the payload offset.
 * Without a password an image opens for inspection only (`OpenOptions.inspectOnly`).
 */
import type { AmendContext, AmendProgressCallback, BlockExtent, CreateOptions, ImageDescription, OpenOptions, ResizeOptions, WriteOptions } from '../../core/block-device.js';
import { growStore } from '../../storage/preallocate.js';
import { DeviceBase } from '../../core/device-base.js';
import { QcowError, invalidArgument } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';
import type { SectorCipher } from '../../crypto/types.js';
import { SECTOR_SIZE } from '../../crypto/types.js';
import { createLuks, luksEncryptInfo, parseLuksHeader, unlockLuks, type CreateLuksOptions, type LuksHeader } from '../../crypto/luks.js';
import { changeLuksSlots, luksSlotChangeOf } from '../../crypto/luks-amend.js';

/** The header is 592 bytes; the first 4 KiB hold it (key material starts at 4 KiB). */
const HEADER_READ = 4096;

const AMEND_OPTIONS = ['state', 'keyslot', 'old-secret', 'new-secret', 'iter-time'];

async function readArea(store: ByteStore, offset: number, length: number): Promise<Uint8Array> {
  const b = new Uint8Array(length);
  await store.read(offset, b);
  return b;
}

const needPassword = (): never => {
  throw new QcowError('QCOW_NEED_PASSWORD', 'LUKS image is encrypted: a password is required (--password-file)');
};

export class LuksDevice extends DeviceBase {
  readonly format = 'luks';
  readonly clusterSize = SECTOR_SIZE;

  private constructor(
    store: ByteStore,
    size: number,
    readOnly: boolean,
    private header: LuksHeader,
    private readonly cipher: SectorCipher | undefined,
    private readonly masterKey: Uint8Array | undefined,
  ) {
    super(store, size, readOnly);
  }

  static async open(store: ByteStore, options: OpenOptions = {}): Promise<LuksDevice> {
    if (options.password === undefined && !options.inspectOnly) needPassword();
    const fileSize = await store.size();
    const head = new Uint8Array(Math.min(HEADER_READ, fileSize));
    await store.read(0, head);
    const header = parseLuksHeader(head, fileSize);
    if (header.payloadOffset > fileSize) throw new QcowError('QCOW_CORRUPT', `LUKS payload offset ${header.payloadOffset} is beyond the end of the file (${fileSize} bytes)`);
    const unlocked = options.password !== undefined ? await unlockLuks(header, (offset, length) => readArea(store, offset, length), options.password) : undefined;
    // Whole sectors, as QEMU counts a node's length (a payload cut mid-sector reads as zeros past the file).
    const size = Math.ceil((fileSize - header.payloadOffset) / SECTOR_SIZE) * SECTOR_SIZE;
    return new LuksDevice(store, size, options.readOnly ?? store.readOnly, header, unlocked?.cipher, unlocked?.masterKey);
  }

  /**
   * The payload ends where the new size says, as QEMU's luks driver resizes: the file is cut or
   * grown (with the preallocation asked for, done by the file: `full` writes zeros into the file,
   * which the guest then reads decrypted, as in QEMU). No key is needed: nothing is encrypted.
   */
  async resize(size: number, options: ResizeOptions = {}): Promise<void> {
    this.checkWritable();
    if (!Number.isSafeInteger(size) || size < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid size ${size}`);
    if (size < this.size && !options.shrink) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Use the --shrink option to perform a shrink operation.', { file: this.filename });
    const base = this.header.payloadOffset;
    const fileEnd = await this.store.size();
    if (base + size > fileEnd) await growStore(this.store, fileEnd, base + size, options.preallocation);
    else await this.store.truncate(base + size);
    this.size = Math.ceil(size / SECTOR_SIZE) * SECTOR_SIZE;
  }

  /** Key slots: `state`, `keyslot`, `old-secret`, `new-secret`, `iter-time` (crypto/luks-amend.ts). */
  async amend(options: Record<string, string>, _progress?: AmendProgressCallback, context: AmendContext = {}): Promise<void> {
    this.checkWritable();
    const noSecrets = (id: string): never => {
      throw invalidArgument(`No secret with id '${id}'`);
    };
    for (const k of Object.keys(options)) if (!AMEND_OPTIONS.includes(k)) throw invalidArgument(`Invalid parameter '${k}'`);
    const change = luksSlotChangeOf(options, '', context.secret ?? noSecrets, !!context.force);
    if (!change) throw invalidArgument('Must specify options (-o)');
    const masterKey = this.masterKey ?? needPassword();
    const area = { read: (offset: number, length: number) => readArea(this.store, offset, length), write: (offset: number, bytes: Uint8Array) => this.store.write(offset, bytes) };
    this.header = await changeLuksSlots(this.header, masterKey, area, change);
    await this.store.flush();
  }

  private get sectorCipher(): SectorCipher {
    return this.cipher ?? needPassword();
  }

  /** The whole sectors around [offset, offset+length), decrypted, and where they start. */
  private async readSectors(offset: number, length: number): Promise<{ first: number; plain: Uint8Array }> {
    const first = Math.floor(offset / SECTOR_SIZE);
    const end = Math.ceil((offset + length) / SECTOR_SIZE);
    const raw = new Uint8Array((end - first) * SECTOR_SIZE);
    await this.store.read(this.header.payloadOffset + first * SECTOR_SIZE, raw);
    return { first, plain: await this.sectorCipher.decrypt(raw, first) };
  }

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    const { first, plain } = await this.readSectors(offset, into.length);
    const skip = offset - first * SECTOR_SIZE;
    into.set(plain.subarray(skip, skip + into.length));
  }

  /** Partial sectors at either end are read, decrypted and merged first (a read-modify-write). */
  protected async doWrite(offset: number, data: Uint8Array, _options: WriteOptions): Promise<void> {
    const cipher = this.sectorCipher;
    let first = Math.floor(offset / SECTOR_SIZE);
    let plain: Uint8Array;
    if (offset % SECTOR_SIZE === 0 && data.length % SECTOR_SIZE === 0) plain = data;
    else {
      ({ first, plain } = await this.readSectors(offset, data.length));
      plain.set(data, offset - first * SECTOR_SIZE);
    }
    await this.store.write(this.header.payloadOffset + first * SECTOR_SIZE, await cipher.encrypt(plain, first));
  }

  /** Every byte is data; none is plain in the file (it is encrypted), so no host offset (as QEMU's map). */
  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return [{ offset, length, allocated: true, zero: false, data: true }];
  }

  async describe(): Promise<ImageDescription> {
    // qemu-img prints the LUKS block's information as the format-specific part, without the
    // `format` key that tells the kinds of qcow2 encryption apart.
    const { format: _format, ...data } = luksEncryptInfo(this.header);
    return { format: 'luks', virtualSize: this.size, encrypted: true, formatSpecific: { type: 'luks', data: data as unknown as Record<string, unknown> } };
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.store.flush();
  }

  protected async doClose(): Promise<void> {
    await this.store.close();
  }
}

const CIPHER_ALGS = ['aes-128', 'aes-256'];
const CIPHER_MODES = ['xts', 'cbc'];
const IVGEN_ALGS = ['plain64', 'essiv'];
const HASH_ALGS = ['sha1', 'sha256', 'sha512'];

/** QEMU's luks create options (`key-secret` names the password, which comes in CreateOptions.password). */
function luksCreateSettings(o: Record<string, string>): { luks: CreateLuksOptions; preallocation: string } {
  const luks: CreateLuksOptions = {};
  const pick = <T extends string>(key: string, allowed: string[]): T | undefined => {
    const v = o[key];
    if (v !== undefined && !allowed.includes(v)) throw invalidArgument(`Parameter '${key}' does not accept value '${v}'`);
    return v as T | undefined;
  };
  for (const key of Object.keys(o)) {
    if (!['size', 'key-secret', 'cipher-alg', 'cipher-mode', 'ivgen-alg', 'ivgen-hash-alg', 'hash-alg', 'iter-time', 'preallocation'].includes(key)) {
      throw invalidArgument(`Invalid parameter '${key}' for format luks`);
    }
  }
  luks.cipherAlg = pick('cipher-alg', CIPHER_ALGS);
  luks.cipherMode = pick('cipher-mode', CIPHER_MODES);
  luks.ivGen = pick('ivgen-alg', IVGEN_ALGS);
  luks.ivGenHashAlg = pick('ivgen-hash-alg', ['sha256']);
  luks.hashAlg = pick('hash-alg', HASH_ALGS);
  if (o['iter-time'] !== undefined) {
    luks.iterTimeMs = Number(o['iter-time']);
    if (!Number.isSafeInteger(luks.iterTimeMs) || luks.iterTimeMs <= 0) throw invalidArgument(`Parameter 'iter-time' expects a positive number, not '${o['iter-time']}'`);
  }
  const preallocation = o.preallocation ?? 'off';
  if (!['off', 'falloc', 'full'].includes(preallocation)) throw invalidArgument(`Invalid preallocation mode: '${preallocation}'`);
  for (const k of Object.keys(luks) as (keyof CreateLuksOptions)[]) if (luks[k] === undefined) delete luks[k];
  return { luks, preallocation };
}

export async function createLuksImage(store: ByteStore, options: CreateOptions): Promise<void> {
  if (options.backingFile) throw invalidArgument("luks images cannot have a backing file ('backing_file' is not an option of luks)");
  const { luks, preallocation } = luksCreateSettings(options.options ?? {});
  if (options.password === undefined) throw invalidArgument("Parameter 'key-secret' is required for cipher");
  const created = await createLuks(options.password, luks);
  const end = created.header.payloadOffset + options.size;
  await store.truncate(0);
  // Only the header and the active slot's key material: the unused slots stay holes, as QEMU leaves them.
  const { area } = created;
  for (let off = 0; off < area.length; off += HEADER_READ) {
    const piece = area.subarray(off, Math.min(off + HEADER_READ, area.length));
    if (piece.some((b) => b !== 0)) await store.write(off, piece);
  }
  // The payload is left to the file layer, as QEMU's driver does: holes (zeros in the file, which
  // do not decrypt to zeros), reserved blocks, or written zeros.
  if (preallocation === 'falloc' && store.allocate && options.size > 0) await store.allocate(created.header.payloadOffset, options.size);
  else if (preallocation === 'full') {
    const chunk = new Uint8Array(Math.min(options.size, 1 << 20));
    for (let off = created.header.payloadOffset; off < end; off += chunk.length) await store.write(off, chunk.subarray(0, Math.min(chunk.length, end - off)));
  }
  await store.truncate(end);
}
