/**
 * QEMU's raw driver options `offset` and `size` (a raw view of part of a file) as the library's
 * RawWindow, from a node's flattened options (`-o`, `--image-opts`, a `json:` name).
 */
import { QcowError, parseSize, type BlockDevice, type NodeOpenOptions, type RawWindow } from '../node.js';

/** The window the options under `prefix` name (`file.` for a raw child), or undefined when they name none. */
export function rawWindowOf(options: Record<string, string>, prefix = ''): RawWindow | undefined {
  const offset = options[`${prefix}offset`];
  const size = options[`${prefix}size`];
  if (offset === undefined && size === undefined) return undefined;
  return { offset: offset === undefined ? undefined : sizeOption('offset', offset), size: size === undefined ? undefined : sizeOption('size', size) };
}

function sizeOption(key: string, text: string): number {
  try {
    // A size as QEMU's options take one: bytes, or with a k, M, G... suffix.
    return parseSize(text);
  } catch {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Parameter '${key}' expects a non-negative number below 2^64`);
  }
}

/**
 * For `.catch()` on opening a raw window: a window its file cannot hold is refused under the
 * name the user gave the node (QEMU's "Could not open 'NAME'"), not the file's.
 */
export function refusedAs(name: string): (e: unknown) => never {
  return (e) => {
    throw e instanceof QcowError && e.code === 'QCOW_INVALID_ARGUMENT' ? new QcowError(e.code, e.message, { file: name, cause: e }) : e;
  };
}

/**
 * An image of `format` whose file is a raw window of `path` (`driver=qcow2,file.driver=raw,
 * file.offset=...,file.file.filename=PATH`): the format reads its bytes through the window.
 */
export async function openOverRawWindow(path: string, window: RawWindow, format: string | undefined, options: NodeOpenOptions): Promise<BlockDevice> {
  const { openImage, defaultOpener } = await import('../cli/open-images.js');
  const { openerWith } = await import('./qemu-io/device-store.js');
  const inner = await openImage(path, { format: 'raw', readOnly: options.readOnly, forceShare: options.forceShare, rawWindow: window });
  try {
    return await openImage(path, { ...options, format, opener: openerWith(defaultOpener, path, inner) });
  } catch (e) {
    await inner.close().catch(() => undefined);
    throw e;
  }
}
