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
import type { FeatureKind, Qcow2Header } from './header.js';

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

/** The name the image gives a feature bit, or qemu's fallback wording. */
export function featureName(h: Qcow2Header, kind: FeatureKind, bit: number): string {
  const named = h.featureNames.find((f) => f.kind === kind && f.bit === bit);
  return named ? named.name : `Unknown ${kind} feature: ${(1n << BigInt(bit)).toString(16)}`;
}

export function checkIncompatibleFeatures(h: Qcow2Header): void {
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown === 0n) return;
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) if ((unknown >> BigInt(bit)) & 1n) names.push(featureName(h, 'incompatible', bit));
  throw unsupported(`Unsupported qcow2 feature(s): ${names.join(', ')}`);
}
