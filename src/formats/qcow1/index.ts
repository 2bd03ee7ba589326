/** The qcow (version 1) format: QEMU's original copy-on-write image format. */
import type { CreateOptions, ImageFormat, OpenOptions } from '../../core/block-device.js';
import type { ByteStore } from '../../storage/types.js';
import { CREATE_OPTIONS, createQcow1 } from './create.js';
import { Qcow1Device } from './device.js';
import { probeQcow1 } from './header.js';

/** The qcow (version 1) format: read, written and created; no check, amend or measure, as in QEMU. */
export const qcowFormat: ImageFormat = {
  name: 'qcow',
  probe: probeQcow1,
  open: (store: ByteStore, options?: OpenOptions) => Qcow1Device.open(store, options),
  create: (store: ByteStore, options: CreateOptions) => createQcow1(store, options),
  createOptions: CREATE_OPTIONS,
};

export { Qcow1Device };
export { decodeHeader, encodeHeader, probeQcow1, type QcowHeader } from './header.js';
