/**
 * What a consistency check reports, for any format that has one (`ImageFormat.check`, as QEMU's
 * drivers have `bdrv_co_check`): counts in qemu-img check's terms, and one line per finding.
 */

/** What `check -r` may repair: leaked clusters only, or everything it can. */
export type RepairMode = 'leaks' | 'all';

/** The result of a check (after any repair, what is left). */
export interface CheckResult {
  /** Errors that can lose or corrupt data (references to bad places, wrong refcounts...). */
  corruptions: number;
  /** Clusters in use by nothing (wasted space, no harm to data). */
  leaks: number;
  /** Errors that kept the check from finishing (unreadable metadata...). */
  checkErrors: number;
  /** Corruptions a repair fixed (counted again afterwards: `corruptions` is what is left). */
  corruptionsFixed: number;
  /** Leaked clusters a repair freed. */
  leaksFixed: number;
  /** Where the image's last used byte ends in its file. */
  imageEndOffset: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  /** Guest clusters that have data or zeros in this image (not from the backing file). */
  allocatedClusters: number;
  /** Allocated clusters not placed right after the one before them in the file. */
  fragmentedClusters: number;
  /** Allocated clusters stored compressed. */
  compressedClusters: number;
  /** One line per finding, in the spirit of qemu-img's wording (it prints them on stderr). */
  messages: string[];
  /**
   * Set when the check stopped short with an error, as QEMU's does with an errno (e.g. `-r leaks`
   * on an image whose refcount structures need a rebuild): the reason in strerror's words
   * ("Input/output error"). The counts are then partial and no summary is shown.
   */
  failed?: string;
}
