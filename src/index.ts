/**
 * The browser-safe core: interfaces, formats, chains and operations. Node-only parts: `qcow/node`.
 *
 * @module qcow
 */
export type { AmendContext, AmendProgressCallback, BlockDevice, BlockExtent, CreateOptions, DiscardPassthrough, ImageDescription, ImageFormat, MeasureRequest, MeasureResult, OpenOptions, OverlapCheck, OverlapCheckOptions, PlacedRange, PlainExtent, PlainRun, Preallocation, RawWindow, ResizeOptions, SnapshotInfo, WriteOptions, ZeroOptions } from './core/block-device.js';
export { DeviceBase, mergeExtents } from './core/device-base.js';
export { QcowError, CorruptionEvent, ImageMarkedCorrupt, UnwrittenMetadata, isQcowError, invalidArgument, type QcowErrorCode, type QcowErrorOptions } from './core/errors.js';
export { FormatRegistry } from './core/registry.js';
export { parseSize, formatSize } from './core/size.js';
export { byteCountText, isExactByteCount } from './core/bytes.js';
export { stringifyExact } from './core/json-exact.js';
export type { ByteStore, DataRun, StoreOpener } from './storage/types.js';
export { permissionsFor, type Permissions, type FileUse } from './storage/permissions.js';
export { isHttpUrl, resolveUrl } from './storage/url.js';
export { MemoryStore } from './storage/memory.js';
export { CachingStore, cachingOpener, DEFAULT_CACHING_CHUNK_SIZE, DEFAULT_CACHING_BYTES, type CachingStoreOptions } from './storage/caching-store.js';
export { openImage as openImageWith, createImage as createImageWith, chainOf, type OpenImageOptions, type CreateImageOptions } from './chain/open.js';
export { withCopyOnRead } from './chain/copy-on-read.js';
export { builtinFormats, rawFormat, qcowFormat, qcow2Format, luksFormat } from './formats/index.js';
export { convert, type ConvertOptions } from './ops/convert.js';
export { compareImages, type CompareOptions, type CompareResult } from './ops/compare.js';
export { mapChain, mapJson, mapHuman, mapHumanLines, type ChainExtent } from './ops/map.js';
export { mapPicture, mapSvg, mapHtml, type MapPicture, type PictureRow, type PictureOptions, type CellCounts, type ByteKind, KINDS as BYTE_KINDS } from './ops/map-picture.js';
export { imageInfo, chainInfo, infoHuman, snapshotTable, type ImageInfoJson } from './ops/info.js';
export { bench, benchPlan, benchHeader, benchFooter, type BenchOptions, type BenchPlan } from './ops/bench.js';
export type { BitmapInfo, DirtyBitmaps } from './core/bitmaps.js';
export { changedExtents, bitmapExtents, changedRuns, bitmapRuns, type DirtyExtent, type ExtentRange } from './ops/changed-extents.js';
export { backup, type BackupOptions, type BackupResult } from './ops/backup.js';
export { checkBitmapCopy, copyBitmaps, type BitmapCopyOptions } from './ops/copy-bitmaps.js';
export { commit, type CommitOptions } from './ops/commit.js';
export { rebase, type RebaseOptions } from './ops/rebase.js';
export { amendImage, amendOptions } from './ops/amend.js';
export { measure, type MeasureOptions } from './ops/measure.js';
export { ddPlan, ddCopy, type DdOptions, type DdPlan } from './ops/dd.js';
export { checkImage, checkableFormat, checkHuman, checkJson, checkExitCode, type CheckImageOptions, type CheckedImage, type CheckResult, type RepairMode } from './ops/check.js';
// Writing an image front to back into a stream (a pipe, an upload, a download).
export { writeImageStream, type ChunkSink, type WriteStreamOptions, type WriteStreamResult } from './streams/write-image.js';
export { webStreamSink, describeSinkErrors } from './streams/sinks.js';
export { memorySpill, type Spill } from './streams/spill.js';
export { readImageStream, webStreamChunks, type ReadStreamOptions, type ReadStreamResult } from './streams/read-image.js';
export { type StreamSource } from './streams/cluster-reader.js';
