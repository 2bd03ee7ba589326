/** Opening an image (and its backing chain) by URL, as a browser page does. */
import type { BlockDevice } from '../core/block-device.js';
import { openImage, type OpenImageOptions } from '../chain/open.js';
import { builtinFormats } from '../formats/index.js';
import { OverlayDevice, type OverlayOptions } from '../overlay/overlay.js';
import { httpOpener, type HttpStoreOptions } from '../storage/http.js';

/** Options of {@link openUrl}: those of {@link OpenImageOptions} (less opener and read-only), plus HTTP and overlay settings. */
export interface OpenUrlOptions extends Partial<Omit<OpenImageOptions, 'opener' | 'formats' | 'readOnly'>> {
  /** Chunk size, cache budget, retries, headers, AbortSignal... for every image of the chain. */
  http?: HttpStoreOptions;
  /** Put a writable in-memory overlay on top (the remote image is never written). */
  writable?: boolean | OverlayOptions;
  /** The formats that may be opened; default {@link builtinFormats}. */
  formats?: OpenImageOptions['formats'];
}

/**
 * Open the image at `url` read-only over HTTP; backing files it names are fetched relative to it.
 * A relative `url` is taken relative to the page.
 *
 * @example
 * ```ts
 * import { openUrl, asV86Buffer } from 'qcow/browser';
 *
 * // Reads fetch ranges of the image; writes stay in memory.
 * const disk = await openUrl('images/debian.qcow2', { writable: true });
 * const emulator = new V86({ hda: { buffer: asV86Buffer(disk) } });
 * ```
 */
export async function openUrl(url: string | URL, options: OpenUrlOptions = {}): Promise<BlockDevice> {
  const { http, writable, formats, ...rest } = options;
  const base = (globalThis as { location?: { href: string } }).location?.href;
  const href = new URL(url, base).href;
  const dev = await openImage(href, { ...rest, readOnly: true, opener: httpOpener(http), formats: formats ?? builtinFormats() });
  if (!writable) return dev;
  return new OverlayDevice(dev, writable === true ? {} : writable);
}
