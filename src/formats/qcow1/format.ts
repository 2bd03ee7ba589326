/**
 * The qcow (version 1) format's entry in the registry. The device (device.ts and the modules under
 * it) is loaded when an image of this format is opened: every image is probed against every
 * format, and a qcow2 or raw image's command started qcow v1's device code for nothing (its modules'
 * set-up, and their code in each command's code cache).
 */
import type { CreateOptions, ImageFormat, OpenOptions } from '../../core/block-device.js';
import type { ByteStore } from '../../storage/types.js';
import { CREATE_OPTIONS, createQcow1 } from './create.js';
import { probeQcow1 } from './header.js';

/** The qcow (version 1) format: read, written and created; no check, amend or measure, as in QEMU. */
export const qcowFormat: ImageFormat = {
  name: 'qcow',
  probe: probeQcow1,
  open: async (store: ByteStore, options?: OpenOptions) => (await import('./device.js')).Qcow1Device.open(store, options),
  create: (store: ByteStore, options: CreateOptions) => createQcow1(store, options),
  createOptions: CREATE_OPTIONS,
};
