/** The qcow (version 1) format: QEMU's original copy-on-write image format. */
import { Qcow1Device } from './device.js';

export { qcowFormat } from './format.js';
export { Qcow1Device };
export { decodeHeader, encodeHeader, probeQcow1, type QcowHeader } from './header.js';
