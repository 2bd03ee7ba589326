/** Every built-in format. Add a format here and every operation, the CLI and the NBD server get it. */
import { FormatRegistry } from '../core/registry.js';
import { rawFormat } from './raw/raw.js';
import { qcowFormat } from './qcow1/index.js';

export const builtinFormats = (): FormatRegistry => new FormatRegistry([rawFormat, qcowFormat]);
export { rawFormat, qcowFormat };
