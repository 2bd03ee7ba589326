/**
 * A store that stands for a file left closed on purpose (qcow2's external data file under
 * OpenOptions.skipDataFile): it has a name to show, and every access fails, so nothing can take
 * the image file's bytes (or zeros) for guest data it never read.
 */
import { QcowError } from '../core/errors.js';
import type { ByteStore } from './types.js';

export function unopenedStore(name: string, readOnly: boolean): ByteStore {
  const refuse = (): Promise<never> => Promise.reject(new QcowError('QCOW_UNSUPPORTED', `'${name}' was not opened (opened for metadata only)`, { file: name }));
  return {
    name,
    readOnly,
    size: refuse,
    read: refuse,
    write: refuse,
    truncate: refuse,
    // Nothing was written through it: there is nothing to make durable or to release.
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
  };
}
