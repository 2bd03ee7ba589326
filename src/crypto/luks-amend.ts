/**
 * LUKS key slot management, as QEMU's `qemu-img amend -o state=...` does it (for the luks format,
 * and for qcow2's `encrypt.` options): add a password to a free (or, forced, a given) slot; erase
 * slots by index or by the password they hold. QEMU's refusals are kept word for word, the one
 * that guards the last active slot included (without it the data is lost for good).
 */
import { QcowError, invalidArgument } from '../core/errors.js';
import { encodeLuksHeader, LUKS_SALT_LENGTH, LUKS_SLOT_COUNT, keyMaterialLength, type LuksHeader } from './luks-header.js';
import { luksKeySlot, luksSlotsOpenedBy, type ReadLuksArea } from './luks.js';
import { randomBytes } from './primitives.js';

/** What to do, with QEMU's secrets already turned into passwords. */
export interface LuksSlotChange {
  state: 'active' | 'inactive';
  keyslot?: number;
  oldPassword?: string;
  newPassword?: string;
  iterTimeMs?: number;
  /** qemu-img amend --force: overwrite an active slot, erase the last one. */
  force?: boolean;
}

/** The LUKS area of an image: reads and writes at offsets from its start. */
export interface LuksAreaIo {
  read: ReadLuksArea;
  write(offset: number, bytes: Uint8Array): Promise<void>;
}

/**
 * The `state`, `keyslot`, `old-secret`, `new-secret` and `iter-time` amend options (under
 * `prefix`, "encrypt." for qcow2) as a change, the secrets looked up in `secret`; undefined when
 * none is given.
 */
export function luksSlotChangeOf(options: Record<string, string>, prefix: string, secret: (id: string) => string, force: boolean): LuksSlotChange | undefined {
  const get = (k: string) => options[prefix + k];
  if (!['state', 'keyslot', 'old-secret', 'new-secret', 'iter-time'].some((k) => get(k) !== undefined)) return undefined;
  const state = get('state');
  if (state === undefined) throw invalidArgument("Parameter 'state' is missing");
  if (state !== 'active' && state !== 'inactive') throw invalidArgument(`Parameter 'state' does not accept value '${state}'`);
  const change: LuksSlotChange = { state, force };
  const keyslot = get('keyslot');
  if (keyslot !== undefined) {
    if (!/^-?\d+$/.test(keyslot)) throw invalidArgument("Parameter 'keyslot' expects a number");
    change.keyslot = Number(BigInt.asUintN(32, BigInt(keyslot)));
  }
  const iter = get('iter-time');
  if (iter !== undefined) {
    change.iterTimeMs = Number(iter);
    if (!Number.isSafeInteger(change.iterTimeMs) || change.iterTimeMs <= 0) throw invalidArgument(`Parameter 'iter-time' expects a positive number, not '${iter}'`);
  }
  if (get('old-secret') !== undefined) change.oldPassword = secret(get('old-secret')!);
  if (get('new-secret') !== undefined) change.newPassword = secret(get('new-secret')!);
  return change;
}

/** Apply `change` to the LUKS area whose header is `header` and master key `masterKey`; the new header. */
export async function changeLuksSlots(header: LuksHeader, masterKey: Uint8Array, area: LuksAreaIo, change: LuksSlotChange): Promise<LuksHeader> {
  const { keyslot } = change;
  if (keyslot !== undefined && keyslot >= LUKS_SLOT_COUNT) throw invalidArgument(`Invalid keyslot ${keyslot} specified, must be between 0 and ${LUKS_SLOT_COUNT - 1}`);
  return change.state === 'active' ? addSlot(header, masterKey, area, change) : eraseSlots(header, area, change);
}

async function addSlot(header: LuksHeader, masterKey: Uint8Array, area: LuksAreaIo, change: LuksSlotChange): Promise<LuksHeader> {
  if (change.oldPassword !== undefined) throw invalidArgument("'old-secret' must not be given when activating keyslots");
  if (change.newPassword === undefined) throw invalidArgument("'new-secret' is required to activate a keyslot");
  let index = change.keyslot;
  if (index === undefined) {
    index = header.slots.findIndex((s) => !s.active);
    if (index < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', "Can't add a keyslot - all keyslots are in use");
  } else if (header.slots[index]!.active && !change.force) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Refusing to overwrite active keyslot ${index} - please erase it first`);
  }
  const { slot, material } = await luksKeySlot(header, index, masterKey, change.newPassword, change.iterTimeMs);
  // Key material first, then the header that makes the slot active: a crash between the two
  // leaves the old header, which never points at half-written material.
  await area.write(slot.keyOffset, material);
  const next: LuksHeader = { ...header, slots: header.slots.map((s, i) => (i === index ? slot : s)) };
  await area.write(0, encodeLuksHeader(next));
  return next;
}

async function eraseSlots(header: LuksHeader, area: LuksAreaIo, change: LuksSlotChange): Promise<LuksHeader> {
  if (change.newPassword !== undefined) throw invalidArgument("'new-secret' must not be given when erasing keyslots");
  if (change.iterTimeMs !== undefined) throw invalidArgument("'iter-time' must not be given when erasing keyslots");
  const active = header.slots.filter((s) => s.active).length;
  let doomed: number[];
  if (change.keyslot !== undefined) {
    const index = change.keyslot;
    if (!header.slots[index]!.active) {
      if (change.force) return header;
      throw invalidArgument(`Given keyslot ${index} is already erased (inactive) `);
    }
    if (change.oldPassword !== undefined && !(await luksSlotsOpenedBy(header, area.read, change.oldPassword)).includes(index)) {
      throw invalidArgument(`Given keyslot ${index} doesn't contain the given old password for erase operation`);
    }
    if (active === 1 && !change.force) {
      throw invalidArgument(`Attempt to erase the only active keyslot ${index} which will erase all the data in the image irreversibly - refusing operation`);
    }
    doomed = [index];
  } else if (change.oldPassword !== undefined) {
    doomed = await luksSlotsOpenedBy(header, area.read, change.oldPassword);
    if (doomed.length === 0) throw invalidArgument('No keyslots match given (old) password for erase operation');
    if (doomed.length === active && !change.force) {
      throw invalidArgument(
        'All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation',
      );
    }
  } else {
    throw invalidArgument('To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given');
  }
  // The header first (the slots no longer open), then the key material overwritten with noise.
  const next: LuksHeader = {
    ...header,
    slots: header.slots.map((s, i) => (doomed.includes(i) ? { ...s, active: false, iterations: 0, salt: new Uint8Array(LUKS_SALT_LENGTH) } : s)),
  };
  await area.write(0, encodeLuksHeader(next));
  for (const i of doomed) {
    const s = header.slots[i]!;
    await area.write(s.keyOffset, randomBytes(keyMaterialLength(header.keyBytes, s.stripes)));
  }
  return next;
}
