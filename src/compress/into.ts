/**
 * `into`, after copying a codec's own output there: for a caller that gave a buffer to a codec
 * path that makes its output itself (a worker's result, the zstd module, node:zlib's fallback).
 */
export function copyInto(into: Uint8Array, data: Uint8Array): Uint8Array {
  if (into.length !== data.length) throw new RangeError(`a ${into.length}-byte buffer for a ${data.length}-byte cluster`);
  into.set(data);
  return into;
}
