/**
 * `dd`, as qemu-img dd does it: copy a source's guest bytes from `skip` blocks in to a new image,
 * at most `count` blocks. The plan follows qemu-img's arithmetic, which differs from dd(1) in one
 * place: the count limits how far into the source the copy reads, and the skip is then taken off
 * that (count=2 skip=1 copies one block, not two).
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';

/** What {@link ddPlan} is asked: qemu-img dd's `bs`, `count` and `skip`. */
export interface DdOptions {
  /** Block size in bytes (qemu-img: 1 to 2^31-1; default 512). */
  blockSize?: number;
  /** Blocks to read at most, counted from the start of the source (see above). */
  count?: bigint | number;
  /** Blocks of the source to skip. */
  skip?: bigint | number;
}

/** What a dd creates and copies ({@link ddPlan}), as qemu-img dd works it out. */
export interface DdPlan {
  /** Size of the image to create, in bytes. */
  outputSize: number;
  /** Where in the source the copy starts (bytes). */
  start: number;
  /** Where in the source the copy stops (bytes, exclusive). */
  end: number;
  /** The skip lies past the end of what is read: nothing is copied (qemu-img warns). */
  skipPastEnd: boolean;
}

const INT64_MAX = (1n << 63n) - 1n;

/** What a dd of a source of `inputSize` bytes creates and copies. */
export function ddPlan(inputSize: number, options: DdOptions = {}): DdPlan {
  const bs = BigInt(options.blockSize ?? 512);
  if (bs < 1n) throw new QcowError('QCOW_INVALID_ARGUMENT', 'dd: the block size must be at least 1');
  let end = BigInt(inputSize);
  // A count*bs that would overflow reads the whole source, as in qemu-img.
  if (options.count !== undefined) {
    const count = BigInt(options.count);
    if (count <= INT64_MAX / bs && count * bs < end) end = count * bs;
  }
  const skip = BigInt(options.skip ?? 0);
  const skipPastEnd = options.skip !== undefined && (skip > INT64_MAX / bs || end < skip * bs);
  const start = skipPastEnd ? end : skip * bs;
  return { outputSize: Number(end - start), start: Number(start), end: Number(end), skipPastEnd };
}

/**
 * Bytes moved per read and write. Blocks only shape the plan (count and skip): the bytes copied are
 * the same whatever the pieces, so a huge `bs` (up to 2 GiB, which qemu-img allocates whole) costs
 * no more memory than a small one.
 */
const CHUNK = 1 << 20;

/** Copies the planned range of `src` to offset 0 of `dst`. */
export async function ddCopy(src: BlockDevice, dst: BlockDevice, plan: DdPlan, signal?: AbortSignal): Promise<void> {
  const step = CHUNK;
  let buf = new Uint8Array(Math.min(step, Math.max(0, plan.end - plan.start)));
  for (let pos = plan.start; pos < plan.end; pos += step) {
    signal?.throwIfAborted();
    const n = Math.min(step, plan.end - pos);
    if (n < buf.length) buf = buf.subarray(0, n);
    await src.read(pos, buf);
    await dst.write(pos - plan.start, buf);
  }
  await dst.flush();
}
