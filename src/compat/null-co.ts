/**
 * QEMU's `null-co` driver: a disk of a given size (`size`, default 1 GiB) that keeps nothing.
 * Writes succeed and are dropped; reads return zeros with `read-zeroes=on` and otherwise leave the
 * caller's buffer as it was (QEMU does not touch it). Block status calls the disk unallocated, and
 * zero where reads give zeros. Test programs (the iotests) use it as a source that costs nothing.
 *
 * It is a protocol driver too: `null-co://` and `json:{"driver": "raw", "file": {"driver":
 * "null-co", ...}}` are a raw image over it, which reads and reports as the node itself does but
 * calls itself raw and places each byte at the same offset of the node (qemu-img map's "offset").
 */
import { DeviceBase, MemoryStore, QcowError, parseSize, type BlockDevice, type BlockExtent, type ImageDescription } from '../node.js';
import { qdictBucket } from './qemu-json.js';

export const NULL_CO = 'null-co';
const DEFAULT_SIZE = 1 << 30;

/** The one filename the null-co protocol takes. */
export const NULL_CO_FILENAME = 'null-co://';

/** The node's bytes: none, and none taken on any disk (qemu-img info's "disk size: 0 B"). */
class NullStore extends MemoryStore {
  constructor(name: string, readOnly: boolean) {
    super(new Uint8Array(0), { name, readOnly });
  }
  async allocatedSize(): Promise<number> {
    return 0;
  }
}

class NullCoDevice extends DeviceBase {
  readonly clusterSize = 512;

  constructor(
    name: string,
    size: number,
    readOnly: boolean,
    private readonly readZeroes: boolean,
    /** null-co itself, or raw over it. */
    readonly format: string,
  ) {
    super(new NullStore(name, readOnly), size, readOnly);
  }
  protected async doRead(_offset: number, into: Uint8Array): Promise<void> {
    if (this.readZeroes) into.fill(0);
  }
  protected async doWrite(): Promise<void> {}
  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    // Without read-zeroes the bytes are whatever the caller's buffer held: QEMU's map does not
    // call them zeros. With it, each byte is at its own offset of the node (map's "offset").
    if (!this.readZeroes) return [{ offset, length, allocated: false, zero: false, data: false, zeroUnknown: true }];
    return [{ offset, length, allocated: true, zero: true, data: false, hostOffset: offset }];
  }
  async describe(): Promise<ImageDescription> {
    return { format: this.format, virtualSize: this.size, driverInfo: false };
  }
  async flush(): Promise<void> {}
  protected async doClose(): Promise<void> {}
}

/**
 * A null-co device from its options (`size`, `read-zeroes`), named `name` in messages; with
 * `format` 'raw', a raw image over one.
 */
export function openNullCo(name: string, options: Record<string, string>, readOnly: boolean, format = NULL_CO): BlockDevice {
  refuseUnknown(options);
  let size = DEFAULT_SIZE;
  try {
    // A size as QEMU's options take one: with a k, M, G... suffix, a fraction of one too.
    if (options.size !== undefined) size = parseSize(options.size);
  } catch {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Parameter 'size' expects a size`);
  }
  const rz = options['read-zeroes'];
  if (rz !== undefined && !['on', 'off', 'true', 'false'].includes(rz)) throw new QcowError('QCOW_INVALID_ARGUMENT', "Parameter 'read-zeroes' expects 'on' or 'off'");
  return new NullCoDevice(name, size, readOnly, rz === 'on' || rz === 'true', format);
}

/** null-co's own options, and those every block node takes. */
const KNOWN = new Set(['driver', 'filename', 'size', 'latency-ns', 'read-zeroes', 'node-name', 'read-only', 'auto-read-only', 'force-share', 'discard', 'detect-zeroes', 'cache.direct', 'cache.no-flush']);

/** QEMU's refusal of an option null-co does not have, naming the first in QEMU's dictionary order. */
function refuseUnknown(options: Record<string, string>): void {
  const unknown = Object.keys(options)
    .map((k, i) => ({ k, i, b: qdictBucket(k) }))
    .filter(({ k }) => !KNOWN.has(k));
  if (unknown.length === 0) return;
  unknown.sort((p, q) => p.b - q.b || q.i - p.i);
  throw new QcowError('QCOW_INVALID_ARGUMENT', `Block protocol '${NULL_CO}' doesn't support the option '${unknown[0]!.k}'`);
}

/**
 * The null-co node's options when `options` (a json: name's or -o's, flattened) put a null-co
 * node under the image (`file.driver` null-co), else undefined.
 */
export function nullCoFileOptions(options: Record<string, string>): Record<string, string> | undefined {
  if (options['file.driver'] !== NULL_CO) return undefined;
  const child: Record<string, string> = {};
  for (const [k, v] of Object.entries(options)) if (k.startsWith('file.') && k !== 'file.driver') child[k.slice(5)] = v;
  return child;
}

/**
 * An image of `format` (the command line's, else the options' driver; raw when neither says)
 * over a null-co node with `child` options: a raw image over it. Another format would read its
 * header from a node that keeps nothing, which QEMU refuses as not in that format.
 */
export function openOverNullCo(name: string, child: Record<string, string>, format: string | undefined, readOnly: boolean): BlockDevice {
  if (format !== undefined && format !== 'raw') throw new QcowError('QCOW_BAD_MAGIC', `Image is not in ${format} format`);
  return openNullCo(name, child, readOnly, 'raw');
}

/** A plain filename of the null-co protocol (`null-co:...`; only `null-co://` is one) as an image of `format`. */
export function openNullCoFilename(name: string, format: string | undefined, readOnly: boolean): BlockDevice {
  if (name !== NULL_CO_FILENAME) throw new QcowError('QCOW_INVALID_ARGUMENT', `The only allowed filename for this driver is '${NULL_CO_FILENAME}'`);
  return openOverNullCo(name, {}, format, readOnly);
}

/** Whether `dev` is a null-co node, or a raw image over one. */
export function isNullCoNode(dev: BlockDevice): boolean {
  return dev instanceof NullCoDevice;
}

/** Whether `name` is a filename of the null-co protocol. */
export function isNullCoFilename(name: string): boolean {
  return name.startsWith(`${NULL_CO}:`);
}
