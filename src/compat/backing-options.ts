/**
 * A node's `backing.*` options (`--image-opts`, a `json:` name): QEMU opens the backing node they
 * describe in place of the one the image records, or with another driver. Only what is open
 * here: the backing node's driver, its file, and a raw one's window.
 */
import { QcowError, type NodeOpenOptions } from '../node.js';
import { qdictBucket } from './qemu-json.js';
import { rawWindowOf } from './raw-window.js';

/** The open options `o` (flattened) gives the top image's backing file. */
export function backingOpenOptions(o: Record<string, string>): Pick<NodeOpenOptions, 'backingFormat' | 'backingFile' | 'backingRawWindow'> {
  const format = o['backing.driver'];
  return {
    backingFormat: format,
    backingFile: o['backing.file.filename'] ?? o['backing.filename'],
    backingRawWindow: format === 'raw' ? rawWindowOf(o, 'backing.') : undefined,
  };
}

/** Whether `o` says anything about the backing node. */
export function hasBackingOptions(o: Record<string, string>): boolean {
  return Object.keys(o).some((k) => k === 'backing' || k.startsWith('backing.'));
}

/**
 * qemu-img info opens an image without its backing file, and then refuses any backing option as
 * one the format does not take: the error names the first of them in QEMU's dictionary order
 * (hash bucket, the later-given first within one). Undefined when `o` has none.
 */
export function backingOptionsRefused(o: Record<string, string>, driver: string): QcowError | undefined {
  const keys = Object.keys(o)
    .map((k, i) => ({ k, i, b: qdictBucket(k) }))
    .filter(({ k }) => k === 'backing' || k.startsWith('backing.'));
  if (keys.length === 0) return undefined;
  keys.sort((p, q) => p.b - q.b || q.i - p.i);
  return new QcowError('QCOW_INVALID_ARGUMENT', `Block format '${driver}' does not support the option '${keys[0]!.k}'`);
}
