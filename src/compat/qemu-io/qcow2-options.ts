/**
 * qcow2's runtime options (those `-o`/`--image-opts` and `reopen -o` give a qcow2 node) checked
 * as QEMU checks them when it opens or reopens the image, in the same order, with its words.
 * qcow sizes its caches itself, so valid cache sizes change nothing; the overlap checks are passed
 * on to the library (overlapCheckOptions); invalid values are refused as QEMU refuses them.
 */
import type { OverlapCheck, OverlapCheckOptions } from '../../node.js';
import { parseNumber } from './text.js';

const INT_MAX = 2 ** 31 - 1;
const UINT_MAX = 2 ** 32 - 1;
const OVERLAP_MODES = ['none', 'constant', 'cached', 'all'] as const;
const OVERLAP_CHECKS: readonly OverlapCheck[] = ['main-header', 'active-l1', 'active-l2', 'refcount-table', 'refcount-block', 'snapshot-table', 'inactive-l1', 'inactive-l2', 'bitmap-directory'];

/** A QemuOpts boolean's value (checked by boolProblem first). */
export const isOn = (v: string): boolean => ['on', 'yes', 'true', 'y'].includes(v);

/**
 * The library's overlap-check options for qcow2's `overlap-check` (or `overlap-check.template`)
 * and `overlap-check.<structure>` options (valid ones: see qcow2OptionProblem), or undefined.
 */
export function overlapCheckOptions(o: Record<string, string>): OverlapCheckOptions | undefined {
  const level = o['overlap-check'] ?? o['overlap-check.template'];
  const checks: Partial<Record<OverlapCheck, boolean>> = {};
  let any = level !== undefined;
  for (const c of OVERLAP_CHECKS) {
    const v = o[`overlap-check.${c}`];
    if (v === undefined) continue;
    checks[c] = isOn(v);
    any = true;
  }
  if (!any) return undefined;
  return { level: (OVERLAP_MODES as readonly string[]).includes(level ?? '') ? (level as OverlapCheckOptions['level']) : undefined, checks };
}

/** qcow2's boolean options (QEMU's QemuOpts bools: on/off, yes/no, true/false, y/n). */
const QCOW2_BOOLS = ['lazy-refcounts', 'pass-discard-request', 'pass-discard-snapshot', 'pass-discard-other', 'discard-no-unref', ...OVERLAP_CHECKS.map((c) => `overlap-check.${c}`)];

/** The block layer's own booleans, common to every node. */
export const GENERIC_BOOLS = ['read-only', 'auto-read-only', 'cache.direct', 'cache.no-flush', 'force-share'];

export function boolProblem(o: Record<string, string>, keys: readonly string[]): string | undefined {
  for (const k of keys) {
    const v = o[k];
    if (v !== undefined && !['on', 'off', 'yes', 'no', 'true', 'false', 'y', 'n'].includes(v)) return `Parameter '${k}' expects 'on' or 'off'`;
  }
  return undefined;
}

/** Why QEMU would refuse these qcow2 options for an image of `clusterSize` and `size`, or undefined. */
export function qcow2OptionProblem(o: Record<string, string>, clusterSize: number, size: number): string | undefined {
  const bools = boolProblem(o, QCOW2_BOOLS);
  if (bools) return bools;
  const cache = qcow2CacheProblem(o, clusterSize, size);
  if (cache) return cache;
  const interval = o['cache-clean-interval'];
  if (interval !== undefined) {
    // A negative number wraps around as QEMU's unsigned parse does.
    const n = parseNumber(interval.trim().replace(/^-/, ''));
    if ('value' in n && (interval.trim().startsWith('-') ? n.value > 0 : n.value > UINT_MAX)) return 'Cache clean interval too big';
  }
  const mode = o['overlap-check'];
  const template = o['overlap-check.template'];
  if (mode !== undefined && template !== undefined && mode !== template) {
    return `Conflicting values for qcow2 options 'overlap-check' ('${mode}') and 'overlap-check.template' ('${template}')`;
  }
  const chosen = mode ?? template;
  if (chosen !== undefined && !(OVERLAP_MODES as readonly string[]).includes(chosen)) {
    return `Unsupported value '${chosen}' for qcow2 option 'overlap-check'. Allowed are any of the following: ${OVERLAP_MODES.join(', ')}`;
  }
  return undefined;
}

/**
 * The options a qcow2 node is reopened with: `given` over the ones it had (`old`), as QEMU's
 * qcow2 joins them. A new overlap mode or template replaces every old overlap option (a template
 * and the checks it implies go together), a new cache-size replaces the old l2/refcount cache
 * sizes, and an old cache-size gives way when all three sizes would otherwise be set and it was
 * not given anew; everything else not given is kept.
 */
export function joinQcow2Options(given: Record<string, string>, old: Record<string, string>): Record<string, string> {
  const kept = { ...old };
  if ('overlap-check' in given || 'overlap-check.template' in given) {
    for (const k of Object.keys(kept)) if (k === 'overlap-check' || k.startsWith('overlap-check.')) delete kept[k];
  }
  if ('cache-size' in given) {
    delete kept['l2-cache-size'];
    delete kept['refcount-cache-size'];
  }
  const joined = { ...kept, ...given };
  if (!('cache-size' in given) && 'cache-size' in joined && 'l2-cache-size' in joined && 'refcount-cache-size' in joined) delete joined['cache-size'];
  return joined;
}

/** Why qemu would refuse these qcow2 cache options (cache-size, l2-cache-size, refcount-cache-size, l2-cache-entry-size), or undefined. */
export function qcow2CacheProblem(o: Record<string, string>, clusterSize: number, size: number): string | undefined {
  const num = (k: string, dflt: number): number => {
    if (o[k] === undefined) return dflt;
    const n = parseNumber(o[k]!);
    return 'value' in n ? n.value : dflt;
  };
  const combinedSet = o['cache-size'] !== undefined;
  const l2Set = o['l2-cache-size'] !== undefined;
  const rcSet = o['refcount-cache-size'] !== undefined;
  const entrySet = o['l2-cache-entry-size'] !== undefined;
  const maxL2 = Math.ceil((Math.ceil(size / clusterSize) * 8) / clusterSize) * clusterSize;
  const combined = num('cache-size', 0);
  const l2Setting = num('l2-cache-size', 32 * 1024 * 1024);
  let rc = num('refcount-cache-size', 0);
  let entry = num('l2-cache-entry-size', clusterSize);
  let l2 = Math.min(maxL2, l2Setting);
  if (combinedSet) {
    if (l2Set && rcSet) return 'cache-size, l2-cache-size and refcount-cache-size may not be set at the same time';
    if (l2Set && l2Setting > combined) return 'l2-cache-size may not exceed cache-size';
    if (rc > combined) return 'refcount-cache-size may not exceed cache-size';
    const minRc = 4 * clusterSize;
    if (l2Set) rc = combined - l2;
    else if (rcSet) l2 = combined - rc;
    else if (combined >= maxL2 + minRc) l2 = maxL2;
    else l2 = combined - Math.min(combined, minRc);
  }
  if (l2 < maxL2 && !entrySet) entry = Math.min(clusterSize, 4096);
  if (entry < 512 || entry > clusterSize || (entry & (entry - 1)) !== 0) {
    return `L2 cache entry size must be a power of two between 512 and the cluster size (${clusterSize})`;
  }
  // QEMU counts its caches in entries, each an int.
  if (Math.floor(l2 / entry) > INT_MAX) return 'L2 cache size too big';
  if (Math.floor(rc / clusterSize) > INT_MAX) return 'Refcount cache size too big';
  return undefined;
}
