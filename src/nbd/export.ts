/**
 * One export: a device under a name, and what the server promises about it in the handshake
 * (transmission flags, block sizes).
 */
import type { BlockDevice } from '../core/block-device.js';
import {
  MAX_PAYLOAD,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from './constants.js';
import type { BlockSizes } from './serializer.js';
import { baseAllocationContext, type MetaContext } from './contexts.js';
export type { ExportedBitmap } from './contexts.js';

export interface NbdExport {
  /** What clients ask for; '' is the default export. */
  name: string;
  /** Shown by clients (nbdinfo's "description"); '' for none. */
  description: string;
  device: BlockDevice;
  /** Refuse writes (NBD_FLAG_READ_ONLY); implied when the device is read-only. */
  readOnly: boolean;
  /** Clients may spread requests over several connections (the server takes more than one at once). */
  multiConn?: boolean;
  /** Metadata contexts offered to block status (default: base:allocation alone). */
  contexts?: readonly MetaContext[];
}


/** The export's metadata contexts. */
export function contextsOf(exp: NbdExport): readonly MetaContext[] {
  return exp.contexts ?? DEFAULT_CONTEXTS;
}

const DEFAULT_CONTEXTS: readonly MetaContext[] = [baseAllocationContext];

export function isReadOnly(exp: NbdExport): boolean {
  return exp.readOnly || exp.device.readOnly;
}

/**
 * Transmission flags, as qemu-nbd sets them. Every connection shares one device (and its caches),
 * so a flush on one covers writes made through all of them; but CAN_MULTI_CONN is only offered
 * when the server takes several clients at once, or a client such as nbdcopy would open
 * connections that wait for a slot that never frees. Read-only exports do not offer the write
 * commands (which they would refuse with EPERM anyway). DF needs structured replies.
 */
export function transmissionFlags(exp: NbdExport, structuredReplies: boolean): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;
  if (isReadOnly(exp)) flags |= NBD_FLAG_READ_ONLY;
  else flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  if (exp.multiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  if (structuredReplies) flags |= NBD_FLAG_SEND_DF;
  return flags;
}

/**
 * Any byte alignment works (formats do read-modify-write themselves); whole clusters avoid that
 * work, so the preferred size is the cluster size, at least 4 KiB and at most the payload limit.
 */
export function blockSizes(exp: NbdExport): BlockSizes {
  const cluster = exp.device.clusterSize;
  const preferred = Math.min(MAX_PAYLOAD, Math.max(4096, isPowerOfTwo(cluster) ? cluster : 4096));
  return { minimum: 1, preferred, maximum: MAX_PAYLOAD };
}

const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;
