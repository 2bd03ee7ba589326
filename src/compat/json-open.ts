/**
 * Opening a QEMU `json:{...}` image name: the options it holds say which driver and which file.
 * `null-co` is a device of its own (./null-co.ts), raw over it too; a format over a file opens that
 * file as that format (a host protocol driver at the top is a raw image over the file). The
 * null-co protocol's own filename, `null-co://`, opens as a raw image over it.
 */
import { QcowError, type BlockDevice, type NodeOpenOptions } from '../node.js';
import { isJsonFilename, jsonFilenameOptions } from './json-filename.js';
import { qemuJsonName } from './json-name.js';
import { openOverRawWindow, rawWindowOf, refusedAs } from './raw-window.js';
import { renamed } from './renamed.js';
import { backingOpenOptions } from './backing-options.js';
import { NULL_CO, isNullCoFilename, nullCoFileOptions, openNullCo, openNullCoFilename, openOverNullCo } from './null-co.js';

const HOST_PROTOCOLS = ['file', 'host_device', 'host_cdrom'];

/** How to open `name` when it is a `json:` name or `null-co://` (for openPolicy.openName), else undefined. */
export function jsonOpenerFor(name: string): ((options: NodeOpenOptions) => Promise<BlockDevice>) | undefined {
  // blkdebug:CONFIG:IMAGE: the image's file is a blkdebug node (../blkdebug).
  if (name.startsWith('blkdebug:')) return (options) => openBlkdebugName(name, {}, options);
  if (isNullCoFilename(name)) return async (options) => openNullCoFilename(name, options.format, !!options.readOnly);
  if (!isJsonFilename(name)) return undefined;
  return (options) => openJsonName(name, options);
}

async function openBlkdebugName(name: string, o: Record<string, string>, options: NodeOpenOptions): Promise<BlockDevice> {
  const { blkdebugNameOptions, childOptions, openOverBlkdebug } = await import('./blkdebug/open.js');
  const node = { ...(name.startsWith('blkdebug:') ? blkdebugNameOptions(name) : {}), ...childOptions(o, 'file.') };
  return openOverBlkdebug(name, node, { ...options, format: o.driver ?? options.format });
}

export async function openJsonName(name: string, options: NodeOpenOptions): Promise<BlockDevice> {
  const o = jsonFilenameOptions(name);
  if (o['file.driver'] === 'blkdebug') return openBlkdebugName(name, o, options);
  if (o.driver === 'blkdebug') {
    const { openBlkdebugFilter } = await import('./blkdebug/open.js');
    return openBlkdebugFilter(name, o, (child) => openNode(name, child, options));
  }
  return openNode(name, o, options);
}

/** A format over a file, or a file (raw), from a node's options. */
async function openNode(name: string, o: Record<string, string>, options: NodeOpenOptions): Promise<BlockDevice> {
  // The command line's format comes before the name's driver, as QEMU's -f does.
  const driver = options.format ?? o.driver;
  // null-co nodes are named as QEMU names them (json-name.ts).
  if (driver === NULL_CO) return openNullCo(qemuJsonName(name, driver) ?? name, o, !!options.readOnly);
  const nullFile = nullCoFileOptions(o);
  if (nullFile) return openOverNullCo(qemuJsonName(name, 'raw') ?? name, nullFile, driver, !!options.readOnly);
  // A format over a raw window of a file: the format reads through the window.
  const fileWindow = o['file.driver'] === 'raw' ? rawWindowOf(o, 'file.') : undefined;
  if (fileWindow && o['file.file.filename'] !== undefined) {
    return renamed(await openOverRawWindow(o['file.file.filename'], fileWindow, driver, options).catch(refusedAs(name)), qemuJsonName(name, driver) ?? name);
  }
  const file = o['file.filename'] ?? o.filename ?? o['file.file.filename'];
  if (file === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'A block device must be specified for "file"');
  const { openImage } = await import('../cli/open-images.js');
  // raw's offset and size: a raw view of part of the file, named as QEMU names the node.
  const window = driver === 'raw' ? rawWindowOf(o) : undefined;
  if (window) return renamed(await openImage(file, { ...options, format: 'raw', rawWindow: window }).catch(refusedAs(name)), qemuJsonName(name, driver) ?? name);
  const backing = backingOpenOptions(o);
  return openImage(file, { ...options, ...backing, backingFormat: backing.backingFormat ?? options.backingFormat, format: driver === undefined || HOST_PROTOCOLS.includes(driver) ? (driver ? 'raw' : undefined) : driver });
}
