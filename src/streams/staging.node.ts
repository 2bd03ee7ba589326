/**
 * Writing a stream into an image that already exists (`convert -n - DST`) without harming it when
 * the stream turns out bad. A stream is only known to be whole at its end: one that ends early,
 * lies in its header or points backwards fails after some of it was written. So what the stream
 * writes lands first in a staging layer over the target (overlay.ts, blocks in a file beside the
 * target), and reaches the target only after the stream ended well; a failure throws the layer
 * away and the target is as it was.
 *
 * The staging file is unlinked as soon as it is open, so a crash leaves nothing behind. The price
 * is writing the streamed data twice (the layer, then the target); a fresh target (without -n) is
 * simply removed on failure and pays nothing.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import type { BlockDevice } from '../core/block-device.js';
import { OverlayDevice } from '../overlay/overlay.js';
import { commit } from '../ops/commit.js';
import { FileStore } from '../storage/file.node.js';
import { join } from 'node:path';

/** A staging layer over an existing image, from {@link stageOver}: write to `device`, then `apply`. */
export interface StagedTarget {
  /** Where the stream writes: reads show the target with what was written so far on top. */
  readonly device: BlockDevice;
  /** Write what the stream wrote into the target. The layer's file is gone when this settles. */
  apply(options?: { signal?: AbortSignal; parallel?: number }): Promise<void>;
}

/**
 * The layer's block: large enough that a fully written image keeps its block index small (about a
 * million blocks at most), small enough that clusters written in part copy little of the target.
 */
function blockSizeFor(size: number): number {
  let block = 64 * 1024;
  while (block < 2 * 1024 * 1024 && size / block > 2 ** 20) block *= 2;
  return block;
}

/**
 * A staging layer over `target` (opened writable), its blocks kept in `dir` (the target's folder:
 * the same file system, where its owner expects the space to be used).
 *
 * @example
 * ```ts
 * const target = await openImage('disk.qcow2');
 * const staged = await stageOver(target, '.');
 * await readImageStream(process.stdin, async () => staged.device, { targetIsZero: false });
 * await staged.apply();      // only now is disk.qcow2 written
 * await staged.device.close(); // closes the target too
 * ```
 */
export async function stageOver(target: BlockDevice, dir: string): Promise<StagedTarget> {
  const folder = await mkdtemp(join(dir, '.qcow-staging-'));
  let store: FileStore;
  try {
    store = await FileStore.open(join(folder, 'blocks'), { create: true, noLock: true });
  } finally {
    // Open files outlive their names: the blocks stay readable and vanish with the descriptor.
    await rm(folder, { recursive: true, force: true });
  }
  const layer = new OverlayDevice(target, { store, blockSize: blockSizeFor(target.size) });
  return {
    device: layer,
    async apply(options = {}) {
      await commit(layer, { base: target, drop: true, signal: options.signal, parallel: options.parallel });
      await target.flush();
    },
  };
}
