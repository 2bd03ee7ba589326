/**
 * The qcow2 ImageFormat: probing and opening here; creating images is create.ts.
 */
import type { CreateOptions, ImageFormat, OpenOptions } from '../../core/block-device.js';
import type { ByteStore } from '../../storage/types.js';
import { QCOW2_MAGIC } from './header.js';
import { Qcow2Device } from './qcow2.js';
import { QCOW2_CREATE_OPTIONS, createQcow2 } from './create.js';

/**
 * What `amend -o help` lists: the options qemu-img amend takes for qcow2 that amend.ts
 * implements. Here rather than in amend.ts, which is loaded only when an amend runs.
 */
const QCOW2_AMEND_OPTIONS: Record<string, string> = {
  backing_file: 'File name of a base image (only its current value: use rebase to change it)',
  backing_fmt: 'Image format of the base image (only its current value)',
  compat: 'Compatibility level (v2 [0.10] or v3 [1.1])',
  lazy_refcounts: 'Postpone refcount updates',
  refcount_bits: 'Width of a reference count entry in bits',
  size: 'Virtual disk size',
};

/** The qcow2 format (versions 2 and 3), with every capability: check, measure, amend (and on its devices snapshots and bitmaps). */
export const qcow2Format: ImageFormat = {
  name: 'qcow2',
  /** Same magic as qcow v1: only versions 2 and 3 are ours. */
  probe(head: Uint8Array): number {
    if (head.length < 8) return 0;
    const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
    if (dv.getUint32(0) !== QCOW2_MAGIC) return 0;
    const v = dv.getUint32(4);
    return v === 2 || v === 3 ? 100 : 0;
  },
  open(store: ByteStore, options?: OpenOptions) {
    return Qcow2Device.open(store, options);
  },
  create(store: ByteStore, options: CreateOptions) {
    return createQcow2(store, options);
  },
  createOptions: QCOW2_CREATE_OPTIONS,
  amendOptions: QCOW2_AMEND_OPTIONS,
  // Loaded when measuring, as the checker is: few commands measure.
  async measure(request) {
    const { measureQcow2 } = await import('./measure.js');
    return measureQcow2(request);
  },
  // Loaded when a check runs: the checker is large and most commands never need it.
  async check(store, options) {
    const { checkQcow2 } = await import('./check.js');
    return checkQcow2(store, options);
  },
};
