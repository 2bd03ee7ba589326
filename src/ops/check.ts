/**
 * `qemu-img check` over any format: the format's own check (`ImageFormat.check`, which QEMU's
 * drivers have as `bdrv_co_check`) found from the image's first bytes or by name, and the
 * report in qemu-img's words (human text, JSON, exit status).
 */
import type { ImageFormat } from '../core/block-device.js';
import type { CheckResult, RepairMode } from '../core/check.js';
import { QcowError } from '../core/errors.js';
import type { FormatRegistry } from '../core/registry.js';
import type { ByteStore } from '../storage/types.js';

export type { CheckResult, RepairMode };

/** What {@link checkImage} found, and in which format. */
export interface CheckedImage extends CheckResult {
  /** The format whose check ran ("qcow2"). */
  format: string;
}

/** How {@link checkImage} finds the image's format and what it may repair. */
export interface CheckImageOptions {
  /** The formats to choose from (`builtinFormats()` for qcow's own). */
  formats: FormatRegistry;
  /** The image's format; probed from its first bytes when absent. */
  format?: string;
  /** Repair leaks, or everything the check can (`-r leaks|all`); the store must be writable. */
  repair?: RepairMode;
}

/**
 * Check the image in `store` with its format's check. A format without one gives
 * QCOW_UNSUPPORTED with qemu-img's words ("This image format does not support checks").
 *
 * @example
 * ```ts
 * import { builtinFormats, checkImage, checkHuman, checkExitCode } from 'qcow';
 * import { FileStore } from 'qcow/node';
 *
 * const store = await FileStore.open('disk.qcow2', { readOnly: true });
 * const r = await checkImage(store, { formats: builtinFormats() });
 * process.stdout.write(checkHuman(r));
 * process.exitCode = checkExitCode(r);
 * await store.close();
 * ```
 */
export async function checkImage(store: ByteStore, options: CheckImageOptions): Promise<CheckedImage> {
  const format = await checkableFormat(store, options);
  if (!format?.check) throw new QcowError('QCOW_UNSUPPORTED', 'This image format does not support checks', { file: store.name });
  return { ...(await format.check(store, { repair: options.repair })), format: format.name };
}

/**
 * The format whose check applies to the image in `store` (named, or probed from its first bytes),
 * or undefined when that format has no check or `options.format` names none of `formats`.
 */
export async function checkableFormat(store: ByteStore, options: Pick<CheckImageOptions, 'formats' | 'format'>): Promise<ImageFormat | undefined> {
  let format: ImageFormat | undefined;
  if (options.format !== undefined) format = options.formats.names().includes(options.format) ? options.formats.get(options.format) : undefined;
  else {
    const head = new Uint8Array(512);
    await store.read(0, head);
    format = options.formats.probe(head);
  }
  return format?.check ? format : undefined;
}

/** qemu-img check's JSON object, keys in its order, optional counts only when non-zero. */
export function checkJson(r: CheckResult, filename: string, format = 'qcow2'): Record<string, unknown> {
  const o: Record<string, unknown> = { 'image-end-offset': r.imageEndOffset };
  if (r.compressedClusters) o['compressed-clusters'] = r.compressedClusters;
  o['total-clusters'] = r.totalClusters;
  if (r.corruptions) o.corruptions = r.corruptions;
  if (r.corruptionsFixed) o['corruptions-fixed'] = r.corruptionsFixed;
  o['check-errors'] = r.checkErrors;
  if (r.leaks) o.leaks = r.leaks;
  if (r.leaksFixed) o['leaks-fixed'] = r.leaksFixed;
  if (r.allocatedClusters) o['allocated-clusters'] = r.allocatedClusters;
  o.filename = filename;
  o.format = format;
  if (r.fragmentedClusters) o['fragmented-clusters'] = r.fragmentedClusters;
  return o;
}

/** qemu-img check's human summary (stdout). */
export function checkHuman(r: CheckResult): string {
  const lines: string[] = [];
  if (r.leaksFixed || r.corruptionsFixed) {
    lines.push('The following inconsistencies were found and repaired:', '');
    lines.push(`    ${r.leaksFixed} leaked clusters`, `    ${r.corruptionsFixed} corruptions`, '', 'Double checking the fixed image now...');
  }
  if (!r.corruptions && !r.leaks && !r.checkErrors) lines.push('No errors were found on the image.');
  if (r.corruptions) lines.push('', `${r.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  if (r.leaks) lines.push('', `${r.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  if (r.totalClusters && r.allocatedClusters) {
    const pct = (n: number, d: number) => ((n * 100) / d).toFixed(2);
    lines.push(
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters`,
    );
  }
  lines.push(`Image end offset: ${r.imageEndOffset}`);
  return lines.join('\n') + '\n';
}

/** qemu-img's exit status: 0 clean, 1 the check could not finish, 2 corruptions left, 3 only leaks left. */
export function checkExitCode(r: CheckResult): number {
  if (r.checkErrors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}
