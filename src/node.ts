/**
 * Node entry: the core plus what needs node: modules (files, the default opener). `openImage`
 * here opens paths and http(s) URLs (read-only) with every built-in format.
 *
 * @module qcow/node
 */
export * from './index.js';
export { FileStore, fileOpener, type FileStoreOptions } from './storage/file.node.js';
export { HttpStore, httpOpener, withHttp, type HttpStoreOptions, type HttpRangeOptions, type HttpStats } from './storage/http.js';
export { nodeFetch } from './storage/node-fetch.node.js';
export { deferredCaAgent } from './storage/deferred-ca.node.js';
// Which kind of image locking this machine gives (`qcow --version` says).
export { lockingKind } from './storage/lock.node.js';
// Which zlib and zstd code handles compressed clusters here (`qcow --version` says).
export { codecKinds } from './compress/kernels.node.js';
// The host addon the qcow launcher has loaded already, handed to the library (see there).
export { adoptHostAddon } from './host/native.node.js';
export { OverlayDevice, type OverlayOptions } from './overlay/overlay.js';
// Opening and creating by path (node-open.ts, which the CLI imports on its own to start faster).
export { defaultOpener, openImage, createImage, type NodeOpenOptions, type NodeCreateOptions } from './node-open.js';
export { nodeWritableSink } from './streams/node-sink.node.js';
export { fileSpill } from './streams/spill-file.node.js';
export { fdSource } from './streams/fd-source.node.js';
export { fdSink } from './streams/fd-sink.node.js';
export { stageOver, type StagedTarget } from './streams/staging.node.js';
// Serving a device over NBD, as `qcow serve` does.
export { serveNbd, type ServeNbdOptions, type NbdServerHandle, type ListenAddress } from './nbd/serve.js';
export { NbdClient, type ConnectOptions as NbdConnectOptions } from './nbd/client.js';
