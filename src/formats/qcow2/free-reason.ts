/**
 * Why a host cluster loses a reference, in QEMU's terms (its qcow2 discard types). When a cluster
 * is left with no reference, whether its blocks go back to the filesystem (a hole punched in the
 * image file) depends on the reason and on the open's `pass-discard-*` options:
 *   - 'request': a guest discard or an unmapping zero write (pass-discard-request; on when the
 *     image is opened with discard=unmap, as qemu-io and qemu-img convert open it);
 *   - 'snapshot': a snapshot deleted, an image emptied by commit (pass-discard-snapshot, on);
 *   - 'other': metadata given up, such as a copied L2 table or a moved table (pass-discard-other,
 *     off);
 *   - 'never': a cluster replaced by a rewrite (never passed on);
 *   - 'always': space shrunk away, zero clusters expanded, bitmap data dropped (always passed on).
 */
export type FreeReason = 'never' | 'always' | 'request' | 'snapshot' | 'other';

/** The open's `pass-discard-request`, `pass-discard-snapshot` and `pass-discard-other`. */
export interface DiscardPassthrough {
  request: boolean;
  snapshot: boolean;
  other: boolean;
}

/** QEMU's defaults for an image opened with discard=unmap. */
export const DEFAULT_DISCARD_PASSTHROUGH: Readonly<DiscardPassthrough> = { request: true, snapshot: true, other: false };

/** Whether freeing a cluster for `reason` gives its blocks back under `p`. */
export function passesDiscard(p: Readonly<DiscardPassthrough>, reason: FreeReason): boolean {
  if (reason === 'never') return false;
  if (reason === 'always') return true;
  return p[reason];
}
