/**
 * Growing a store the way QEMU's file driver grows a file with a preallocation mode (what raw and
 * LUKS images pass down to their file when they are resized): `off` sets the length, `falloc`
 * reserves the new blocks, `full` writes zeros into them. `metadata` has no meaning for a file.
 */
import type { Preallocation } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';
import type { ByteStore } from './types.js';

/** Grow `store` from `from` to `to` bytes with `mode` (QCOW_UNSUPPORTED for `metadata`). */
export async function growStore(store: ByteStore, from: number, to: number, mode: Preallocation = 'off'): Promise<void> {
  if (mode === 'metadata') throw new QcowError('QCOW_UNSUPPORTED', 'Unsupported preallocation mode: metadata', { file: store.name });
  if (mode === 'falloc' && store.allocate && to > from) {
    await store.allocate(from, to - from);
    // (allocate grows the store only as far as it reserves: the length is set exactly.)
    await store.truncate(to);
    return;
  }
  if (mode === 'full' && to > from) {
    const chunk = new Uint8Array(Math.min(to - from, 1 << 20));
    for (let at = from; at < to; at += chunk.length) await store.write(at, chunk.subarray(0, Math.min(chunk.length, to - at)));
    return;
  }
  await store.truncate(to);
}
