/**
 * Opening QEMU's blkdebug nodes for the compat front ends: the `blkdebug:CONFIG:IMAGE` filename
 * (CONFIG may be empty), and a node's options (`config`, `align`, `max-transfer`, inline
 * `inject-error.N.*` / `set-state.N.*` rules, the `image` child as `image.filename`, `image`
 * or the filename's image). A format over blkdebug opens over a BlkdebugStore on the image file,
 * so the format's driver events reach the rules (store.ts).
 */
import { readFileSync } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import { QcowError, type BlockDevice, type NodeOpenOptions, type StoreOpener } from '../../node.js';
import { qemuSize } from '../qemu-img/options.js';
import { optionGroups, parseConfigText, ruleOf, type BlkdebugRule } from './rules.js';
import { BlkdebugStore, type BlkdebugLimits } from './store.js';

export const BLKDEBUG = 'blkdebug';
const PREFIX = 'blkdebug:';

export function isBlkdebugName(name: string | undefined): boolean {
  return name !== undefined && name.startsWith(PREFIX);
}

/**
 * A `blkdebug:CONFIG:IMAGE` name as the blkdebug node's options (`config`, `x-image`), QEMU's
 * way: the config file is what comes before the next colon.
 */
export function blkdebugNameOptions(name: string): Record<string, string> {
  const rest = name.slice(PREFIX.length);
  const colon = rest.indexOf(':');
  if (colon < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', 'blkdebug requires both config file and image path');
  const out: Record<string, string> = { 'x-image': rest.slice(colon + 1) };
  if (colon > 0) out.config = rest.slice(0, colon);
  return out;
}

/** The options of the child `prefix` (`file.`) of a dotted option list, without the prefix. */
export function childOptions(o: Record<string, string>, prefix: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(o)) if (k.startsWith(prefix)) out[k.slice(prefix.length)] = v;
  return out;
}

function size(o: Record<string, string>, key: string): number {
  const v = o[key];
  if (v === undefined) return 0;
  try {
    return qemuSize(v);
  } catch {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Parameter '${key}' expects a non-negative number below 2^64`);
  }
}

/** The rules and limits a blkdebug node's options give; fails as QEMU's open fails. */
export function blkdebugSetup(o: Record<string, string>): { rules: BlkdebugRule[]; limits: BlkdebugLimits } {
  const groups = [];
  if (o.config !== undefined) {
    let text: string;
    try {
      text = readFileSync(o.config, 'utf8');
    } catch (e) {
      throw new QcowError('QCOW_INVALID_ARGUMENT', 'Could not read blkdebug config file', { cause: e });
    }
    groups.push(...parseConfigText(text, o.config));
  }
  groups.push(...optionGroups(o));
  const rules = groups.filter((g) => g.action === 'inject-error').map(ruleOf);
  rules.push(...groups.filter((g) => g.action === 'set-state').map(ruleOf));
  const align = size(o, 'align');
  if (align !== 0 && (align >= 2 ** 31 - 1 || (align & (align - 1)) !== 0)) throw new QcowError('QCOW_INVALID_ARGUMENT', `Cannot meet constraints with align ${align}`);
  const maxTransfer = size(o, 'max-transfer');
  const unit = Math.max(align, 1);
  if (maxTransfer !== 0 && (maxTransfer >= 2 ** 31 - 1 || maxTransfer % unit !== 0)) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Cannot meet constraints with max-transfer ${maxTransfer}`);
  }
  const constrained = (key: string, value: number, of: number) => {
    if (value !== 0 && (value >= 2 ** 31 - 1 || value % of !== 0)) throw new QcowError('QCOW_INVALID_ARGUMENT', `Cannot meet constraints with ${key} ${value}`);
    return value;
  };
  const optWriteZero = constrained('opt-write-zero', size(o, 'opt-write-zero'), unit);
  const maxWriteZero = constrained('max-write-zero', size(o, 'max-write-zero'), Math.max(optWriteZero, unit));
  const optDiscard = constrained('opt-discard', size(o, 'opt-discard'), unit);
  constrained('max-discard', size(o, 'max-discard'), Math.max(optDiscard, unit));
  return { rules, limits: { align: unit, maxTransfer, optWriteZero, maxWriteZero } };
}

/** The image file under a blkdebug node (`image.filename`, `image` or the filename's). */
function imageFile(o: Record<string, string>): string {
  const file = o['image.filename'] ?? o['image.file.filename'] ?? o.image ?? o['x-image'];
  if (file === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'A block device must be specified for "image"');
  return file;
}

/**
 * `base`, except that `name` opens as a BlkdebugStore over its image file, and names relative to
 * it resolve against that file.
 */
export function blkdebugOpener(base: StoreOpener, name: string, node: Record<string, string>): StoreOpener {
  const { rules, limits } = blkdebugSetup(node);
  const file = imageFile(node);
  let used = false;
  return {
    open: async (n, opts) => {
      if (n !== name || used) return base.open(n, opts);
      used = true;
      return new BlkdebugStore(await base.open(file, opts), rules, limits, name);
    },
    resolve: (n, rel) => base.resolve(n, rel === name ? file : rel),
    exists: (n) => (n === name ? Promise.resolve(true) : (base.exists?.(n) ?? Promise.resolve(true))),
    remove: base.remove && ((n) => base.remove!(n)),
  };
}

/**
 * The opener for an image whose `data-file` option is a blkdebug node, or raw over one: `base`,
 * except that the node's image file opens as a BlkdebugStore over it. Undefined without one.
 */
export function dataFileOpener(base: StoreOpener, o: Record<string, string>): StoreOpener | undefined {
  const raw = o['data-file.driver'] === 'raw' && o['data-file.file.driver'] === BLKDEBUG;
  if (!raw && o['data-file.driver'] !== BLKDEBUG) return undefined;
  const node = childOptions(o, raw ? 'data-file.file.' : 'data-file.');
  const { rules, limits } = blkdebugSetup(node);
  const file = resolvePath(imageFile(node));
  return {
    open: async (n, opts) => {
      const store = await base.open(n, opts);
      return resolvePath(n) === file ? new BlkdebugStore(store, rules, { ...limits, rawAbove: raw }) : store;
    },
    resolve: (n, rel) => base.resolve(n, rel),
    exists: base.exists && ((n) => base.exists!(n)),
    remove: base.remove && ((n) => base.remove!(n)),
  };
}

/**
 * A format (`options.format`, probed when absent) opened over a blkdebug node whose options are
 * `node`, shown as `name` (QEMU shows the blkdebug: name, or the json: one).
 */
export async function openOverBlkdebug(name: string, node: Record<string, string>, options: NodeOpenOptions): Promise<BlockDevice> {
  const { openImage, defaultOpener } = await import('../../cli/open-images.js');
  return openImage(name, { ...options, opener: blkdebugOpener(options.opener ?? defaultOpener, name, node) });
}

/**
 * blkdebug above a format (`driver=blkdebug,image.driver=qcow2`): the image child opened by
 * `openChild` with its own options (`image.*`, its file the filename's image when not given; a
 * child without a driver is the file itself, raw), under the filter. Shown as `name`.
 */
export async function openBlkdebugFilter(name: string, node: Record<string, string>, openChild: (options: Record<string, string>) => Promise<BlockDevice>): Promise<BlockDevice> {
  const { rules, limits } = blkdebugSetup(node);
  const child = childOptions(node, 'image.');
  if (child.driver === undefined) child.driver = 'file';
  if (child.filename === undefined && child['file.filename'] === undefined) child.filename = imageFile(node);
  const inner = await openChild(child);
  const { blkdebugFilter } = await import('./device.js');
  return blkdebugFilter(inner, rules, limits, name);
}
