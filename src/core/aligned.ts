/**
 * Page-aligned I/O buffers.
 *
 * A large `new Uint8Array(n)` comes from malloc, which on Linux (glibc) maps it and hands out the
 * address 16 bytes into the first page. The kernel then copies between the page cache (page
 * aligned) and an address 16 bytes off, and that costs: reading 2 MiB of cached file into such a
 * buffer took 311 µs (median of 30) against 226-242 µs at other offsets on our 2-core VM; the
 * stores trail the loads by 16 bytes modulo 4 KiB, which the CPU takes for a possible overlap
 * (4K aliasing). qemu-img allocates its buffers aligned (qemu_blockalign) and does not pay this.
 *
 * JavaScript cannot ask for an address, but a WebAssembly memory always starts on a page
 * boundary (the engine maps it directly), and its pages are 64 KiB, so buffers cut from it at
 * multiples of 4 KiB are page aligned too. Where WebAssembly is missing or refuses the memory,
 * plain arrays are used: slower to copy into, never wrong.
 */

const PAGE = 4096;
const WASM_PAGE = 65536;

/** `count` buffers of `size` bytes each, page aligned where the platform allows, zero-filled. */
export function alignedBuffers(count: number, size: number): Uint8Array[] {
  const stride = Math.ceil(size / PAGE) * PAGE;
  const total = stride * count;
  let memory: ArrayBuffer | undefined;
  // Small buffers gain nothing worth a memory mapping of their own.
  if (size >= WASM_PAGE && typeof WebAssembly !== 'undefined') {
    try {
      memory = new WebAssembly.Memory({ initial: Math.ceil(total / WASM_PAGE) }).buffer;
    } catch {
      memory = undefined;
    }
  }
  return Array.from({ length: count }, (_, i) => (memory ? new Uint8Array(memory, i * stride, size) : new Uint8Array(size)));
}

/** One page-aligned buffer (see alignedBuffers). */
export const alignedBuffer = (size: number): Uint8Array => alignedBuffers(1, size)[0]!;
