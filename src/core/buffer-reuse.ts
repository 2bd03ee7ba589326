/**
 * Buffers kept for reuse, for code that reads into a temporary buffer again and again.
 * On this kind of VM a process pays ~12-16 µs for every page it touches first, more than a read
 * costs to copy into it, and a fresh `new Uint8Array(n)` is fresh pages once n passes malloc's mmap
 * threshold (or once glibc has trimmed its heap). A kept buffer's pages are already there.
 *
 * Bounded: the buffers held add up to at most `budgetBytes`; what does not fit is left to the
 * garbage collector. A buffer must not be used after it is given back.
 */
export class BufferReuse {
  private readonly free: Uint8Array[] = [];
  private held = 0;

  constructor(private readonly budgetBytes: number) {}

  /** `n` bytes of unspecified content: the front of a kept buffer when one is large enough. */
  take(n: number): Uint8Array {
    for (let i = this.free.length - 1; i >= 0; i--) {
      const b = this.free[i]!;
      if (b.length >= n) {
        this.free.splice(i, 1);
        this.held -= b.length;
        return b.subarray(0, n);
      }
    }
    // Rounded up, so that a slightly larger request later can reuse it.
    const size = roundUp(n);
    return new Uint8Array(size <= this.budgetBytes ? size : n).subarray(0, n);
  }

  /** Hand back a buffer from take() once nothing refers to it any more. */
  give(b: Uint8Array): void {
    const whole = new Uint8Array(b.buffer, 0, b.buffer.byteLength);
    if (this.held + whole.length > this.budgetBytes) return;
    this.free.push(whole);
    this.held += whole.length;
  }
}

const MiB = 1024 * 1024;
/** Powers of two up to 1 MiB (at least a page), whole MiB above. */
const roundUp = (n: number): number => (n <= MiB ? 2 ** Math.ceil(Math.log2(Math.max(n, 4096))) : Math.ceil(n / MiB) * MiB);
