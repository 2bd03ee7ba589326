/** Every built-in format. Add a format here and every operation, the CLI and the NBD server get it. */
import { FormatRegistry } from '../core/registry.js';
import { rawFormat } from './raw/raw.js';
import { qcowFormat } from './qcow1/format.js';
import { qcow2Format } from './qcow2/format.js';
import { luksFormat } from './luks/format.js';

/** A new registry of the built-in formats: raw, qcow (v1), qcow2 and luks. The open and create functions use it by default. */
export const builtinFormats = (): FormatRegistry => new FormatRegistry([rawFormat, qcowFormat, qcow2Format, luksFormat]);
export { rawFormat, qcowFormat, qcow2Format, luksFormat };
