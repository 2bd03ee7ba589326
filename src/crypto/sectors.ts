import { invalidArgument } from '../core/errors.js';
import { SECTOR_SIZE } from './types.js';

/** The number of 512-byte sectors in `data`; throws unless it is a whole number of them. */
export function checkWholeSectors(data: Uint8Array): number {
  if (data.length % SECTOR_SIZE !== 0) throw invalidArgument(`encrypted I/O of ${data.length} bytes is not a whole number of ${SECTOR_SIZE}-byte sectors`);
  return data.length / SECTOR_SIZE;
}
