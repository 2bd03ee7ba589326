/** A device under another name: the name QEMU shows for a node (info's "image:", errors). */
import type { BlockDevice } from '../node.js';

/** `dev` under another name (what info prints and errors say); everything else is the device's own. */
export function renamed(dev: BlockDevice, filename: string): BlockDevice {
  return new Proxy(dev, {
    get(target, key) {
      if (key === 'filename') return filename;
      const v = Reflect.get(target, key, target) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}
