/**
 * Node entry: the core plus what needs node: modules (files, the default opener). `openImage`
 * here opens paths and http(s) URLs (read-only) with every built-in format.
 */
import type { BlockDevice } from './core/block-device.js';
import { openImage as openChain, createImage as createChain, type OpenImageOptions, type CreateImageOptions } from './chain/open.js';
import { builtinFormats } from './formats/index.js';
import { fileOpener, FileStore } from './storage/file.node.js';
import { withHttp } from './storage/http.js';
import type { StoreOpener } from './storage/types.js';

export * from './index.js';
export { FileStore, fileOpener };
export { HttpStore, httpOpener, withHttp, type HttpStoreOptions, type HttpStats } from './storage/http.js';
export { OverlayDevice, type OverlayOptions } from './overlay/overlay.js';

/** The opener the CLI uses: local paths, and http(s) URLs (whose backing names resolve against the URL). */
export const defaultOpener: StoreOpener = withHttp(fileOpener);

export type NodeOpenOptions = Partial<Omit<OpenImageOptions, 'opener' | 'formats'>> & Partial<Pick<OpenImageOptions, 'opener' | 'formats'>>;

/** Open an image file (and its backing chain) by path. */
export function openImage(path: string, options: NodeOpenOptions = {}): Promise<BlockDevice> {
  return openChain(path, { ...options, opener: options.opener ?? defaultOpener, formats: options.formats ?? builtinFormats() });
}

export type NodeCreateOptions = Partial<Omit<CreateImageOptions, 'opener' | 'formats' | 'format' | 'size'>> &
  Partial<Pick<CreateImageOptions, 'opener' | 'formats'>> & { format: string; size?: number };

/** Create an image file. */
export function createImage(path: string, options: NodeCreateOptions): Promise<void> {
  return createChain(path, { ...options, size: options.size ?? 0, opener: options.opener ?? defaultOpener, formats: options.formats ?? builtinFormats() });
}
