/**
 * Browser entry: the core plus images over HTTP, the in-memory overlay and adapters for
 * emulators. Nothing here imports node: modules; the build bundles it as one ES module.
 *
 * @module qcow/browser
 */
export * from '../index.js';
export { HttpStore, httpOpener, DEFAULT_CHUNK_SIZE, DEFAULT_CACHE_BYTES, type HttpStoreOptions, type HttpRangeOptions, type HttpStats } from '../storage/http.js';
export { OverlayDevice, overlay, type OverlayOptions } from '../overlay/overlay.js';
export { openUrl, type OpenUrlOptions } from './open-url.js';
// Local files (an <input type=file> or drag and drop): images and their backing files, read-only.
export { BlobStore, blobOpener } from '../storage/blob.js';
export { asV86Buffer, asAsyncBuffer, type V86Buffer, type V86BufferOptions, type AsyncBuffer } from './adapters.js';
