/**
 * QCOW2 feature bits and the policy for them.
 *
 * Stable API (the qcow2 writer imports it): the bit constants below (as bigint masks), and
 * `checkIncompatibleFeatures(header)`, which throws QCOW_UNSUPPORTED for any incompatible bit this
 * library does not implement, naming it from the image's feature-name table when the table has it
 * (as qemu does). The corrupt and dirty bits are known bits; what they mean for opening is decided
 * by the device (corrupt: read-only only; dirty: refcounts are not trusted).
 */
import { unsupported } from '../../core/errors.js';
import type { Qcow2Header } from './header.js';

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;

export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

export const hasFeature = (field: bigint, mask: bigint): boolean => (field & mask) !== 0n;

/**
 * Refuse an image with incompatible bits we do not implement, worded as QEMU words it: the bits the
 * image's feature-name table names, in the table's order, then the rest as one hex mask.
 */
export function checkIncompatibleFeatures(h: Qcow2Header): void {
  let unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown === 0n) return;
  const names: string[] = [];
  for (const f of h.featureNames) {
    const bit = 1n << BigInt(f.bit);
    if (f.kind !== 'incompatible' || f.bit > 63 || !(unknown & bit)) continue;
    names.push(f.name);
    unknown &= ~bit;
  }
  if (unknown) names.push(`Unknown incompatible feature: ${unknown.toString(16)}`);
  throw unsupported(`Unsupported qcow2 feature(s): ${names.join(', ')}`);
}
