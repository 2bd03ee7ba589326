/**
 * Metadata contexts an export offers to NBD_CMD_BLOCK_STATUS: each a name clients select in the
 * handshake (NBD_OPT_SET_META_CONTEXT) and the extents it reports for a range. base:allocation is
 * always offered; qemu:allocation-depth when the server is asked to (qcow serve -A, as qemu-nbd
 * -A). A dirty bitmap export adds one more context of the same shape.
 */
import type { BlockDevice } from '../core/block-device.js';
import { allocationDepthExtents, allocationExtents, type AllocationExtent } from './allocation.js';
import { BASE_ALLOCATION, NBD_STATE_DIRTY, QEMU_DIRTY_BITMAP_PREFIX } from './constants.js';

/** The view of a dirty bitmap an export needs: its name and its dirty runs over a range. */
export interface ExportedBitmap {
  name: string;
  extents(offset: number, length: number): Promise<Array<{ offset: number; length: number; dirty: boolean }>>;
}

export interface MetaContext {
  /** The full name, `namespace:leaf` (base:allocation, qemu:allocation-depth, ...). */
  readonly name: string;
  /** Extents over [offset, offset + length): at most `max`, covering at least a prefix of the range. */
  extents(dev: BlockDevice, offset: number, length: number, max: number): Promise<AllocationExtent[]>;
}

export const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';

export const baseAllocationContext: MetaContext = { name: BASE_ALLOCATION, extents: allocationExtents };
export const allocationDepthContext: MetaContext = { name: QEMU_ALLOCATION_DEPTH, extents: allocationDepthExtents };

/** A persistent dirty bitmap as qemu:dirty-bitmap:NAME (qemu-nbd -B): NBD_STATE_DIRTY where it is set. */
export function dirtyBitmapContext(bitmap: ExportedBitmap): MetaContext {
  return {
    name: QEMU_DIRTY_BITMAP_PREFIX + bitmap.name,
    async extents(_dev, offset, length, max) {
      const runs = await bitmap.extents(offset, length);
      return runs.slice(0, max).map((r) => ({ offset: r.offset, length: r.length, flags: r.dirty ? NBD_STATE_DIRTY : 0 }));
    },
  };
}

/**
 * The contexts `queries` name among `available`. A query is a full name; when listing
 * (NBD_OPT_LIST_META_CONTEXT) a bare `namespace:` also names every context of the namespace, and
 * no query at all names every context, as the protocol specifies. Order follows `available`.
 */
export function matchContexts(available: readonly MetaContext[], queries: readonly string[], listing: boolean): MetaContext[] {
  if (listing && queries.length === 0) return [...available];
  return available.filter((c) => queries.some((q) => q === c.name || (listing && q.endsWith(':') && c.name.startsWith(q))));
}
