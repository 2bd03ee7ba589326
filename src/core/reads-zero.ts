/**
 * Whether a range of a device reads as zeros, judged from allocation alone (no data is read), as
 * qemu's qcow2 driver asks before it turns a partial-cluster zero write into a zero cluster
 * (is_zero over bdrv_block_status_above): every part must be zero where a layer allocates it,
 * or allocated by no layer, or past the end of the layer below.
 */
import type { BlockDevice } from './block-device.js';

type Layer = Pick<BlockDevice, 'blockStatus' | 'backing' | 'size'>;

export async function readsAsZero(dev: Layer, offset: number, length: number): Promise<boolean> {
  const end = Math.min(offset + length, dev.size);
  if (end <= offset) return true;
  for (const x of await dev.blockStatus(offset, end - offset)) {
    if (x.allocated) {
      if (!x.zero) return false;
      continue;
    }
    if (dev.backing && !(await readsAsZero(dev.backing, x.offset, x.length))) return false;
  }
  return true;
}
