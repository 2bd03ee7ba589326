/**
 * The parts of an open qcow2 device that its on-demand modules (amend.ts, snapshot-write.ts) work
 * on. The device loads those modules only when an amend or a snapshot change runs, so they name
 * what they use here instead of importing the device back (which would be an import cycle).
 */
import type { Qcow2Geometry } from './layout.js';
import type { L2Context } from './l2-entry.js';
import type { Qcow2Image } from './image.js';
import type { ClusterMap } from './cluster-map.js';
import type { Qcow2Writer } from './write.js';
import type { ByteStore } from '../../storage/types.js';

export interface Qcow2DeviceParts {
  readonly clusterSize: number;
  readonly size: number;
  readonly store: ByteStore;
  readonly geometry: Qcow2Geometry;
  readonly l2Context: L2Context;
  /** The image's state: header, stores, file size. */
  readonly image: Qcow2Image;
  /** L1 ownership, L2 lookup and linking. */
  readonly map: ClusterMap;
  readonly l1: Uint8Array;
  readonly l1Entries: number;
  /** The writer (the image is open for writing), or a read-only error. */
  requireWriter(): Qcow2Writer;
  /** OpenOptions.onWarning, when the opener gave one. */
  readonly onWarning?: ((message: string) => void) | undefined;
}
