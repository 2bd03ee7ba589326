import type { Permissions } from './permissions.js';

/**
 * A byte store is where an image's bytes live: a local file, memory, or an HTTP resource.
 * Formats see only this interface, so every format works on every store.
 */
export interface ByteStore {
  /** What to call this store in messages: a path or URL. */
  readonly name: string;
  /** Opened without write access: write and truncate fail with QCOW_READ_ONLY. */
  readonly readOnly: boolean;
  /** Current length in bytes. */
  size(): Promise<number>;
  /**
   * Fill `into` from `offset`. Returns how many bytes came from the store; at end of store the
   * rest of `into` is set to zero (holes and truncated images read as zeros, as in QEMU).
   */
  read(offset: number, into: Uint8Array): Promise<number>;
  /** Write `data` at `offset`, growing the store when it ends past the current length. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Set the length, growing with zeros or cutting. */
  truncate(size: number): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  /** Bytes the store really occupies (a sparse file's allocated blocks); size() where unknown. */
  allocatedSize?(): Promise<number>;
  /**
   * Which parts of [offset, offset + length) hold data and which are holes (a sparse file's
   * unallocated ranges, which read as zeros), in order and covering the range. Absent where the
   * store cannot tell: everything then counts as data.
   */
  dataRuns?(offset: number, length: number): Promise<DataRun[]>;
  /**
   * With dataRuns: true when the store knows now, without asking the host, that [offset, offset +
   * length) is all data (from what an earlier dataRuns found). False says nothing either way.
   */
  dataKnownNow?(offset: number, length: number): boolean;
  /** Give the host blocks of [offset, offset + length) back; the range then reads as zeros. The size is unchanged. */
  punchHole?(offset: number, length: number): Promise<void>;
  /** Make [offset, offset + length) read as zeros without writing them; the blocks stay reserved. */
  zeroRange?(offset: number, length: number): Promise<void>;
  /** Reserve host blocks for [offset, offset + length), growing the store when that is past its end. */
  allocate?(offset: number, length: number): Promise<void>;
  /**
   * Copy [from, from + length) of this store into `target` at `to` without the bytes passing
   * through JavaScript (copy_file_range: the kernel copies, or shares the blocks where the file
   * system can). Resolves with the bytes copied, fewer only when this store ends first (the rest
   * reads as zeros). Fails with QCOW_UNSUPPORTED when this pair of stores cannot do it (not two
   * local files, different file systems, a kernel without the call): callers then read and write.
   */
  copyTo?(target: ByteStore, from: number, to: number, length: number): Promise<number>;
  /**
   * The host file descriptor behind this store, for a native copy loop (ops/native-copy.ts) that
   * reads it, or writes it when `write` is true, with its own system calls instead of read() and
   * write(). Undefined where that must not be done: a closed store, and for writing a read-only
   * store or one whose writes must each be flushed. Absent without the host addon.
   */
  directFd?(write: boolean): number | undefined;
  /**
   * A native loop wrote [offset, offset + length) through directFd: the bookkeeping write() does
   * after a write (FileStore's write-behind).
   */
  wroteDirectly?(offset: number, length: number): void;
  /**
   * Move [from, from + length) of this store into the pipe `pipe` (a file descriptor) without the
   * bytes passing through JavaScript (splice: the pipe takes the page cache's pages, the reader's
   * read is the only copy). Resolves with the bytes moved: fewer when the store ends first, or
   * when it failed after moving some (the next call reports the failure). Fails with
   * QCOW_UNSUPPORTED where the file cannot be spliced (callers then read and write); other
   * failures (EPIPE: the reader went away) keep their errno code. Absent without the host addon.
   */
  spliceTo?(pipe: number, from: number, length: number): Promise<number>;
  /**
   * A server's read reply without the bytes passing through JavaScript: when the page cache holds
   * every byte of [offset, offset + length), write `head` to the stream socket `socketFd` (a
   * non-blocking descriptor whose own write queue is empty), then have the kernel send the range
   * after it (sendfile) until done or the socket is full. Returns the bytes sent, head included;
   * the caller sends the rest itself, in order (readNow gives the data). -1: nothing was sent
   * (some of the range is not cached, or the host cannot). Absent where the store is no local
   * file or the host addon lacks the call.
   */
  sendCached?(socketFd: number, head: Uint8Array, offset: number, length: number): number;
  /** With sendCached: whether the page cache holds every byte of [offset, offset + length). */
  isCached?(offset: number, length: number): boolean;
  /** With sendCached: fill `into` from `offset` at once, waiting for the disk if need be (zeros past the end). */
  readNow?(offset: number, into: Uint8Array): void;
  /**
   * Fill `into` from `offset` now when the page cache holds all of it, without waiting for the
   * disk (preadv2 RWF_NOWAIT): true when it did; false when it did not (`into` then holds
   * nothing meaningful: read it the usual way). Present on stores opened for a server that
   * answers reads from the page cache (FileStore's cachedReadsInline).
   */
  readCachedNow?(offset: number, into: Uint8Array): boolean;
  /**
   * Publish these permissions (QEMU's image locks, see permissions.ts) in place of those taken at
   * open; QCOW_LOCKED when another program's use conflicts. Stores without locks lack it.
   */
  setPermissions?(p: Permissions): void;
  /**
   * A format driver tells the store underneath what it is about to do ("l2_load", "read_aio":
   * QEMU's blkdebug event names), as QEMU's drivers tell their file node. Only a debugging store
   * (compat's blkdebug, which injects errors on such events) has it; drivers call it as
   * `store.debugEvent?.(name)`, which costs one property check when it is absent. It returns a
   * promise when the request must wait before going on (a blkdebug breakpoint suspended it):
   * the data reads and writes (`read_aio`, `write_aio`) wait for it before their store request.
   */
  debugEvent?(event: string): Promise<void> | void;
  /** Release the store (the file handle, its locks); it is not used afterwards. */
  close(): Promise<void>;
}

/** A run of a store's bytes that holds data, or is a hole (reads as zeros, occupies nothing). */
export interface DataRun {
  /** Byte offset in the store where the run starts. */
  offset: number;
  /** Length of the run in bytes. */
  length: number;
  /** True: the run holds data; false: it is a hole. */
  data: boolean;
}

/**
 * Opens stores by name: the image itself, and the files it names (backing files, external data
 * files) relative to itself. The open and create functions get all their bytes through one;
 * `fileOpener` (`qcow/node`), `httpOpener` and `blobOpener` (`qcow/browser`) are the built-in ones.
 */
export interface StoreOpener {
  /**
   * `permissions`: the locks to take at open (default: those of an image file holding metadata).
   * `cachedReadsInline`: a hint for servers of large reads (local files: see FileStore); others
   * ignore it.
   */
  open(name: string, options: { readOnly: boolean; create?: boolean; permissions?: Permissions; cachedReadsInline?: boolean }): Promise<ByteStore>;
  /** Resolve `name` as written in the image against the store that names it. */
  resolve(name: string, relativeTo: string): string;
  /** Whether `name` exists (create uses it to know whether a failed create may remove the file). */
  exists?(name: string): Promise<boolean>;
  /** Delete a file (a half-made image after a failed create). */
  remove?(name: string): Promise<void>;
}
