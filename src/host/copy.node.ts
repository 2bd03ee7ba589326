/**
 * Native help for the copy loops (`#host-copy` on Node; copy.browser.ts elsewhere), from the host
 * addon when it is loaded: the zero scan of copy buffers and copy buffers on huge pages.
 */
import { hostAddon, type HostAddon } from './native.node.js';

export type BlockRunEnd = NonNullable<HostAddon['blockRunEnd']>;

let scanner: BlockRunEnd | null | undefined;

/**
 * The addon's blockRunEnd, or undefined without the addon (or QCOW_NO_NATIVE=1). ops/zero-scan.ts
 * asks it once per run of blocks instead of once per 4 KiB block: run by JavaScript, the
 * per-block calls were ~40 ms of the ~120 ms of JavaScript in a 1 GiB convert, plus V8's
 * optimising compile of the loop.
 */
export function nativeBlockRunEnd(): BlockRunEnd | undefined {
  if (scanner === undefined) scanner = hostAddon()?.blockRunEnd ?? null;
  return scanner ?? undefined;
}

export type ContiguousEntries = NonNullable<HostAddon['contiguousEntries']>;

let entries: ContiguousEntries | null | undefined;

/**
 * The addon's contiguousEntries, or undefined without it (or QCOW_NO_NATIVE=1). A copy of an
 * image with small clusters compares every L2 entry twice (its block status, then its reads),
 * and in a short process most of those comparisons ran before V8 optimised the JavaScript loop:
 * ~29 M of the ~86 M instructions past Node's start of a 512 MiB convert with 4 KiB clusters
 * (callgrind), ~12 M of a 3-layer chain's.
 */
export function nativeContiguousEntries(): ContiguousEntries | undefined {
  if (entries === undefined) entries = hostAddon()?.contiguousEntries ?? null;
  return entries ?? undefined;
}

export type CopyExtents = NonNullable<HostAddon['copyExtents']>;

/** The addon's copyExtents (ops/native-copy.ts), or undefined without it (or QCOW_NO_NATIVE=1). */
export function nativeCopyExtents(): CopyExtents | undefined {
  return hostAddon()?.copyExtents;
}

export type CompareExtents = NonNullable<HostAddon['compareExtents']>;

/** The addon's compareExtents (ops/native-compare.ts), or undefined without it (or QCOW_NO_NATIVE=1). */
export function nativeCompareExtents(): CompareExtents | undefined {
  return hostAddon()?.compareExtents;
}

const HUGE = 2 * 1024 * 1024;
const WASM_PAGE = 65536;

/**
 * `count` zero-filled buffers of `size` bytes on transparent huge pages (2 MiB), each starting on
 * one; undefined where that cannot be had (no addon, buffers under 1 MiB, no WebAssembly memory,
 * a kernel without THP). What it saves is per 4 KiB page: the kernel's copy into a buffer takes a
 * page fault and TLB misses per page, and the zero scan after it, reading the first bytes of each
 * 4 KiB block from another core than the one the kernel copied on, took ~150 ns a block (38 ms per
 * GiB); on huge pages 3 ms, and the system time of reading 1 GiB from the page cache went from
 * 0.25 s to 0.16-0.18 s (measured on our 2-core VM, THP set to "madvise").
 */
export function hugePageBuffers(count: number, size: number): Uint8Array[] | undefined {
  const advise = hostAddon()?.adviseHugePages;
  if (!advise || size < HUGE / 2 || typeof WebAssembly === 'undefined') return undefined;
  const stride = Math.ceil(size / HUGE) * HUGE;
  let memory: ArrayBuffer;
  try {
    // One huge page more than needed: where the engine placed the memory is not ours to choose.
    memory = new WebAssembly.Memory({ initial: (stride * count + HUGE) / WASM_PAGE }).buffer;
  } catch {
    return undefined;
  }
  const at = advise(new Uint8Array(memory));
  if (at < 0 || at + stride * count > memory.byteLength) return undefined;
  return Array.from({ length: count }, (_, i) => new Uint8Array(memory, at + i * stride, size));
}
