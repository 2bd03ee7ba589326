/**
 * Opening and creating image files on node, without the rest of the library: node.ts re-exports
 * these, and the CLI imports them from here so a command loads only what it uses. The HTTP store
 * is imported when a name is an http(s) URL, not before.
 */
import type { BlockDevice } from './core/block-device.js';
import { openImage as openChain, createImage as createChain, type OpenImageOptions, type CreateImageOptions } from './chain/open.js';
import { builtinFormats } from './formats/index.js';
import { deferredCaAgent } from './storage/deferred-ca.node.js';
import { nodeFetch } from './storage/node-fetch.node.js';
import { fileOpener } from './storage/file.node.js';
import type { StoreOpener } from './storage/types.js';
import { isHttpUrl, resolveUrl } from './storage/url.js';

/** `withHttp(local)` from storage/http.ts, with the HTTP code loaded on the first http(s) name. */
function withLazyHttp(local: StoreOpener): StoreOpener {
  let both: Promise<StoreOpener> | undefined;
  const http = (): Promise<StoreOpener> => (both ??= import('./storage/http.js').then((m) => m.withHttp(local, { fetch: nodeFetch(deferredCaAgent()) })));
  return {
    open: async (name, o) => (isHttpUrl(name) ? (await http()).open(name, o) : local.open(name, o)),
    resolve: (name, relativeTo) => (isHttpUrl(relativeTo) ? resolveUrl(name, relativeTo) : isHttpUrl(name) ? name : local.resolve(name, relativeTo)),
    exists: async (name) => (isHttpUrl(name) ? (await http()).exists!(name) : local.exists ? local.exists(name) : true),
    remove: async (name) => (isHttpUrl(name) ? (await http()).remove!(name) : local.remove?.(name)),
  };
}

/** The opener the CLI uses: local paths, and http(s) URLs (whose backing names resolve against the URL). */
export const defaultOpener: StoreOpener = withLazyHttp(fileOpener);

/** Options of {@link openImage}: those of {@link OpenImageOptions}, with `opener` and `formats` optional (default: files and http(s) URLs, the built-in formats). */
export type NodeOpenOptions = Partial<Omit<OpenImageOptions, 'opener' | 'formats'>> & Partial<Pick<OpenImageOptions, 'opener' | 'formats'>>;

/**
 * Open an image file (and its backing chain) by path, or an http(s) URL read-only; the format is
 * probed unless `format` is given. The files are locked as QEMU locks them.
 *
 * @example
 * ```ts
 * import { openImage } from 'qcow/node';
 *
 * await using dev = await openImage('disk.qcow2', { readOnly: true });
 * const info = await dev.describe();
 * console.log(info.format, info.virtualSize, dev.backing?.filename);
 * ```
 */
export function openImage(path: string, options: NodeOpenOptions = {}): Promise<BlockDevice> {
  return openChain(path, { ...options, opener: options.opener ?? defaultOpener, formats: options.formats ?? builtinFormats() });
}

/**
 * Options of {@link createImage}: those of {@link CreateImageOptions}, with `opener` and `formats`
 * optional, and `size` too when a backing file gives it.
 */
export type NodeCreateOptions = Partial<Omit<CreateImageOptions, 'opener' | 'formats' | 'format' | 'size'>> &
  Partial<Pick<CreateImageOptions, 'opener' | 'formats'>> & {
    /** The new image's format ("qcow2", "qcow", "raw"). */
    format: string;
    /** Virtual size in bytes; optional with a backing file, whose size is then taken. */
    size?: number;
  };

/**
 * Create an empty image file, as `qemu-img create` does; a backing file is opened to check it
 * (and to take its size when none is given) unless `unsafe`.
 *
 * @example
 * ```ts
 * import { createImage, parseSize } from 'qcow/node';
 *
 * await createImage('base.qcow2', { format: 'qcow2', size: parseSize('10G') });
 * await createImage('top.qcow2', { format: 'qcow2', backingFile: 'base.qcow2', backingFormat: 'qcow2' });
 * ```
 */
export function createImage(path: string, options: NodeCreateOptions): Promise<void> {
  return createChain(path, { ...options, size: options.size ?? 0, opener: options.opener ?? defaultOpener, formats: options.formats ?? builtinFormats() });
}
