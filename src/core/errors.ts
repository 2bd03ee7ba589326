/**
 * One error class for everything the library reports on purpose. `code` is stable and meant for
 * programs; `message` is one line meant for people. The CLI prints `qcow: <file>: <message>` and
 * maps the code to an exit status, so nothing user-facing ever needs a stack trace.
 */
/** The stable codes of {@link QcowError}; the comment on each says when it is used. */
export type QcowErrorCode =
  | 'QCOW_BAD_MAGIC' // not an image of the expected format
  | 'QCOW_CORRUPT' // the image contradicts its own format
  | 'QCOW_UNSUPPORTED' // valid, but uses something we do not implement or QEMU refuses too
  | 'QCOW_NEED_PASSWORD' // encrypted image opened without a password
  | 'QCOW_BAD_PASSWORD' // the password does not unlock the image
  | 'QCOW_READ_ONLY' // a write to something opened or exported read-only
  | 'QCOW_OUT_OF_RANGE' // a request past the end of the device
  | 'QCOW_INVALID_ARGUMENT' // the caller asked for something malformed
  | 'QCOW_NOT_FOUND' // a file (image, backing file, data file) does not exist
  | 'QCOW_LOCKED' // another writer holds the image
  | 'QCOW_ABORTED' // an AbortSignal fired
  | 'QCOW_IO'; // the underlying storage failed

/** Extra fields of a {@link QcowError} at construction. */
export interface QcowErrorOptions {
  /** The underlying error (an fs error, a fetch failure), kept as the standard `cause`. */
  cause?: unknown;
  /** The image (path or URL) the error is about, when known. */
  file?: string;
  /**
   * The POSIX error QEMU fails with here ("EFBIG", "EINVAL"), where it is not the one the code
   * stands for (the compat front ends print its text).
   */
  errno?: string;
}

/**
 * The error the library throws on purpose: a stable `code` for programs, a one-line `message`
 * for people, and the image it is about in `file` when known.
 *
 * @example
 * ```ts
 * import { openImage, isQcowError } from 'qcow/node';
 *
 * try {
 *   await openImage('secret.qcow2');
 * } catch (e) {
 *   if (isQcowError(e) && e.code === 'QCOW_NEED_PASSWORD') console.log(`${e.file} is encrypted`);
 *   else throw e;
 * }
 * ```
 */
export class QcowError extends Error {
  /** Always "QcowError". */
  override readonly name = 'QcowError';
  /** What went wrong, stable across versions: match on this, not on `message`. */
  readonly code: QcowErrorCode;
  /** The image (path or URL) the error is about, when known; filled in as the error passes through a device. */
  file: string | undefined;
  /** QcowErrorOptions.errno: QEMU's errno for this failure where the code's would be wrong. */
  readonly errno: string | undefined;

  constructor(code: QcowErrorCode, message: string, options: QcowErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.file = options.file;
    this.errno = options.errno;
  }
}

/** True when `e` is a {@link QcowError} (narrows its type). */
export const isQcowError = (e: unknown): e is QcowError => e instanceof QcowError;

/**
 * Corruption found while an image is in use (a structure its header accepted turns out broken
 * when a write needs it), as QEMU's qcow2 signals it: a writable image is then marked corrupt on
 * disk (`markedCorrupt`), so nothing writes to it again until it is repaired, and the request fails.
 */
export class CorruptionEvent extends QcowError {
  /** True once the image has been marked corrupt on disk because of this event. */
  markedCorrupt = false;
  /**
   * True once the event made the image unusable for the session (set with markedCorrupt, and
   * alone on a version 2 image, which has no corrupt bit): QEMU says "Marking image as corrupt"
   * either way.
   */
  fatal = false;
  /**
   * True when an earlier corruption event of the same session was already signalled: QEMU says
   * "Image is corrupt" once per image ("further non-fatal corruption events will be suppressed").
   */
  suppressed = false;
  /** True once OpenOptions.onCorruption was told this event (as it was signalled). */
  told = false;
  constructor(message: string, file?: string) {
    super('QCOW_CORRUPT', message, { file });
  }
}

/**
 * A number as C's `%#x` prints it, the way QEMU's corruption messages show offsets and indices:
 * hexadecimal with `0x`, except zero, which is a bare `0`.
 */
export function altHex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

/**
 * A request to an image that a CorruptionEvent made unusable for the rest of the session (QEMU
 * drops the node's driver then, and every later request fails with ENOMEDIUM: "No medium found").
 */
export class ImageMarkedCorrupt extends QcowError {
  constructor(event: CorruptionEvent, file?: string) {
    super('QCOW_CORRUPT', `the image was marked corrupt (${event.message}): repair it with check -r all`, { file });
  }
}

/**
 * Metadata changes a close could not write, because the request that made them was refused
 * (qcow2's overlap check, see overlap.ts): QEMU keeps them in its `structure` cache and fails to
 * flush it at close ("Failed to flush the refcount block cache: ..."), then the next cache in
 * `also` (the L2 table cache is flushed before the refcount block cache). The close otherwise
 * went on.
 */
export class UnwrittenMetadata extends QcowError {
  /** Every cache that could not be written back, in the order QEMU flushes them. */
  readonly structures: ReadonlyArray<'refcount block' | 'L2 table'>;
  constructor(
    /** Which cached structure could not be written back (the first). */
    readonly structure: 'refcount block' | 'L2 table',
    /** Why: the refusal of the write (an overlap check's, with QEMU's errno). */
    readonly reason: QcowError,
    file?: string,
    also: ReadonlyArray<'refcount block' | 'L2 table'> = [],
  ) {
    super(reason.code, `${[structure, ...also].join(' and ')} updates could not be written: ${reason.message}`, { file, errno: reason.errno });
    this.structures = [structure, ...also];
  }
}

/** Shorthands: the throw sites read as the rule they enforce. */
export function corrupt(message: string, file?: string): QcowError {
  return new QcowError('QCOW_CORRUPT', message, { file });
}
export function unsupported(message: string, file?: string): QcowError {
  return new QcowError('QCOW_UNSUPPORTED', message, { file });
}
/** A QCOW_INVALID_ARGUMENT error: what the caller asked for cannot be done as asked. */
export function invalidArgument(message: string): QcowError {
  return new QcowError('QCOW_INVALID_ARGUMENT', message);
}

/** Attach a file name to a QcowError that does not have one yet, and pass anything else through. */
export function withFile(e: unknown, file: string): unknown {
  if (e instanceof QcowError && e.file === undefined) e.file = file;
  return e;
}

/** Throw QCOW_ABORTED if the signal has fired. Long loops call this between steps. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new QcowError('QCOW_ABORTED', 'operation aborted', { cause: signal.reason });
}
