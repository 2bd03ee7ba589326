/**
 * The parts of `qcow/node` that only some conversions use (an image read from or written into a
 * stream, an HTTP server without Range requests, --bitmaps): convert.ts imports this module when a
 * command line asks for one of them, so a plain file-to-file convert does not set them up.
 */
export {
  chainOf,
  checkBitmapCopy,
  copyBitmaps,
  deferredCaAgent,
  describeSinkErrors,
  fdSink,
  fdSource,
  fileSpill,
  nodeFetch,
  nodeWritableSink,
  readImageStream,
  stageOver,
  webStreamChunks,
  writeImageStream,
} from '../../node.js';
