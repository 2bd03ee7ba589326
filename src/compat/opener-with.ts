/**
 * An opener that hands out one store already open under a name, for the compat front ends' images
 * that are not plain files (an image inside another image, an NBD export): the format opens that
 * name as usual, and everything else (backing files, resolution, existence) goes to `base`.
 */
import type { ByteStore, StoreOpener } from '../node.js';

/** `base`, except that `name` opens as the given store (once: a second open is a new one from `base`). */
export function openerWithStore(base: StoreOpener, name: string, store: ByteStore): StoreOpener {
  let used = false;
  return {
    open: async (n, o) => {
      if (n === name && !used) {
        used = true;
        return store;
      }
      return base.open(n, o);
    },
    resolve: (n, rel) => base.resolve(n, rel),
    exists: base.exists && ((n) => (n === name ? Promise.resolve(true) : base.exists!(n))),
    remove: base.remove && ((n) => base.remove!(n)),
  };
}
