/** `#host-copy` outside Node: no native help (ops/zero-scan.ts scans in JavaScript). */
export type BlockRunEnd = (bytes: Uint8Array, from: number, end: number, unit: number, zero: boolean) => number;

export function nativeBlockRunEnd(): BlockRunEnd | undefined {
  return undefined;
}

export type ContiguousEntries = (table: Uint8Array, index: number, max: number, clusterSize: number) => number;

export function nativeContiguousEntries(): ContiguousEntries | undefined {
  return undefined;
}

export type CopyExtents = (buf: Uint8Array, extents: Float64Array, count: number, dstFd: number, dstOffset: number, length: number, unit: number, flags: number, runs: Float64Array) => Promise<number>;

export function nativeCopyExtents(): CopyExtents | undefined {
  return undefined;
}

export type CompareExtents = (bufA: Uint8Array, bufB: Uint8Array, extA: Float64Array, countA: number, extB: Float64Array, countB: number, length: number, piece: number) => Promise<number>;

export function nativeCompareExtents(): CompareExtents | undefined {
  return undefined;
}

export function hugePageBuffers(): Uint8Array[] | undefined {
  return undefined;
}
