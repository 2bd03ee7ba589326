/**
 * The host layer: system calls Node's fs module lacks (OFD byte-range locks, SEEK_DATA/SEEK_HOLE,
 * fallocate, copy_file_range, file mappings), a zero scan, huge-page buffers, zstd decoding
 * through the system's libzstd and zlib without node:zlib's streams, from our own N-API addon
 * (native/qcow_host.c, built by node-gyp when the package is installed). `hostAddon()` gives the addon, or undefined when it is not there (no compiler at
 * install time, not Linux, a browser bundle) or is turned off with QCOW_NO_NATIVE=1; every user
 * has a pure TypeScript fallback.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** Lock types, as the addon takes and reports them. */
export const UNLOCK = 0;
export const SHARED = 1;
export const EXCLUSIVE = 2;
export type LockType = typeof UNLOCK | typeof SHARED | typeof EXCLUSIVE;

export interface HostAddon {
  /** F_OFD_SETLK on [start, start + length): true when taken, false when another holder conflicts. */
  ofdLock(fd: number, start: number, length: number, type: LockType): boolean;
  /** F_OFD_GETLK: 0 when `type` could be taken on the range, else the conflicting lock's type. */
  ofdTest(fd: number, start: number, length: number, type: typeof SHARED | typeof EXCLUSIVE): LockType;
  /** lseek SEEK_DATA: the next data at or after `offset`, -1 when none. */
  seekData(fd: number, offset: number): number;
  /** lseek SEEK_HOLE: the next hole at or after `offset` (the end of the file at worst). */
  seekHole(fd: number, offset: number): number;
  /** fallocate(2) with FALLOC_FL_* `mode` bits. */
  fallocate(fd: number, mode: number, offset: number, length: number): void;
  /**
   * copy_file_range(2) on libuv's thread pool, looping until `length` bytes are copied or the
   * source ends: resolves with the bytes copied. Rejects with the errno's name as `code`.
   */
  copyFileRange?(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, length: number): Promise<number>;
  /**
   * The copy loop of one item of a plain convert into a raw file, on libuv's thread pool
   * (native/copy_loop.c, ops/native-copy.ts): `count` triples [srcFd or -1 for zeros, srcOffset,
   * bytes] in `extents` read into `buf`, scanned for zero blocks of `unit` bytes and written at
   * `dstOffset` of `dstFd` as convert's chunkWrites would (`flags` 1: the target reads as zeros,
   * 2: -S 0). Resolves with the count of [kind, offset, bytes] records put into `runs` (kind 1
   * written, 0 zeros left to the caller). Rejects with the errno's name as `code`, `syscall`
   * and the failing descriptor as `fd`.
   */
  copyExtents?(buf: Uint8Array, extents: Float64Array, count: number, dstFd: number, dstOffset: number, length: number, unit: number, flags: number, runs: Float64Array): Promise<number>;
  /**
   * The compare loop of one item of `qemu-img compare` on libuv's thread pool (native/
   * compare_loop.c): both sides' [fd, offset, bytes] extents read piece by piece into `bufA` and
   * `bufB` and compared there. Resolves with the offset in the item of the first differing byte,
   * or -1. Rejects with the errno's name as `code`, `syscall` and the failing descriptor as `fd`.
   * Absent before version 11.
   */
  compareExtents?(bufA: Uint8Array, bufB: Uint8Array, extA: Float64Array, countA: number, extB: Float64Array, countB: number, length: number, piece: number): Promise<number>;
  /**
   * splice(2) [offsetIn, +length) of the file `fdIn` into the pipe `pipe` on libuv's thread pool,
   * looping until `length` bytes are moved or the file ends: resolves with the bytes moved. The
   * pipe holds the file's page-cache pages, not copies. Rejects with the errno's name as `code`
   * (EPIPE when the pipe's reader has gone). Absent before version 9.
   */
  spliceToPipe?(fdIn: number, offsetIn: number, pipe: number, length: number): Promise<number>;
  /**
   * On libuv's thread pool: sync_file_range(SYNC_FILE_RANGE_WRITE) on [offset, +length) (start
   * writing it back, without waiting; nothing when length is 0), then posix_fadvise(DONTNEED) on [dropOffset, +dropLength)
   * when dropLength > 0 (the pages of that range that are clean by then leave the page cache).
   * Rejects with the errno's name as `code` and the descriptor as `fd`. Absent
   * before version 6.
   */
  writeBehind?(fd: number, offset: number, length: number, dropOffset: number, dropLength: number): Promise<void>;
  /**
   * Over the blocks of `unit` bytes of `bytes` from `from` (the last cut at `end`): the offset of
   * the first block that is not all zeros (`zero` true) or is all zeros (`zero` false), else `end`.
   * Absent from addons built before version 3.
   */
  blockRunEnd?(bytes: Uint8Array, from: number, end: number, unit: number, zero: boolean): number;
  /**
   * The end (exclusive index) of the run of 8-byte big-endian L2 entries from `index`, at most
   * `max`, each the one before plus `clusterSize` (formats/qcow2/l2-entry.ts contiguousEntries).
   * Throws a RangeError unless `max` >= 1 and the entries lie inside `table`. Absent before
   * version 8.
   */
  contiguousEntries?(table: Uint8Array, index: number, max: number, clusterSize: number): number;
  /**
   * madvise(MADV_HUGEPAGE) on the whole 2 MiB pages inside `bytes` (anonymous memory): the offset
   * of the first one in `bytes`, or -1. Absent from addons built before version 3.
   */
  adviseHugePages?(bytes: Uint8Array): number;
  /**
   * The whole file as a latin1 string that V8 reads in place from a read-only mapping (bin/qcow.cjs
   * maps its bundle with it); undefined where Node has no external strings (before 20.4). The file
   * must be replaced by rename, not rewritten, while the string lives. Absent before version 4.
   */
  mapText?(path: string): string | undefined;
  /** The whole file as a Buffer over a private (copy-on-write) mapping. Absent before version 4. */
  mapBytes?(path: string): Buffer;
  /** The CPUs this process may run on (sched_getaffinity), as node:os's. Absent before version 4. */
  availableParallelism?(): number;
  /**
   * The system's libzstd (libzstd.so.1, loaded on the first call) as ZSTD_versionNumber() gives
   * it, e.g. 10504 for 1.5.4; 0 when it cannot be loaded. Absent before version 5.
   */
  zstdVersion?(): number;
  /**
   * Decode the zstd frame(s) of `src` into `into` with libzstd (a context kept per thread): the
   * bytes written. Throws (code ZSTD_ERROR, zstd's message) on corrupt input or output larger than
   * `into`. Only when zstdVersion() > 0. Absent before version 5.
   */
  zstdDecompress?(src: Uint8Array, into: Uint8Array): number;
  /**
   * One read at `fd`'s position that never waits (preadv2 RWF_NOWAIT): the bytes read (0 at the
   * end), -1 when it would wait, -2 when the kernel offers no such read for `fd`. Absent before
   * version 6.
   */
  readNoWait?(fd: number, into: Uint8Array): number;
  /**
   * The same at `position`, leaving the file position alone: for a regular file, the part of the
   * range the page cache holds (from its start), -1 when none of it, -2 as above. Absent before
   * version 8.
   */
  preadNoWait?(fd: number, into: Uint8Array, position: number): number;
  /**
   * Whether every page of [position, +length) of `fd` is in the page cache (cachestat): 1 or 0;
   * -2 when the kernel cannot tell. Absent before version 9.
   */
  rangeCached?(fd: number, position: number, length: number): number;
  /**
   * Write `head` to the socket `outFd`, then sendfile(2) [position, +length) of `inFd` after it,
   * until done or the socket is full, only when every page of the range is in the page cache: the
   * bytes sent (head included; the caller sends the rest), -1 when part of the range is not
   * cached (nothing sent), -2 when the kernel cannot (no cachestat, or sendfile refuses these
   * descriptors; nothing sent). Throws the errno otherwise: EPIPE or ECONNRESET for a peer gone
   * (named so since round twelve; EIO before). Absent before version 9.
   */
  sendFileCached?(outFd: number, head: Uint8Array, inFd: number, position: number, length: number): number;
  /**
   * poll(2) `fd` for reading for up to `timeoutMs`: true when a read would not wait (data, the
   * end or an error), false when the time ran out or a signal came. Absent before version 6.
   */
  waitReadable?(fd: number, timeoutMs: number): boolean;
  /**
   * Ask for a pipe buffer of `bytes` (F_SETPIPE_SZ; the kernel refuses more than
   * /proc/sys/fs/pipe-max-size, 1 MiB by default, to the unprivileged): the buffer's size
   * afterwards, -1 when `fd` is no pipe. Never throws. Absent before version 7.
   */
  growPipe?(fd: number, bytes: number): number;
  /**
   * Ask for a socket send buffer of at least `bytes` (SO_SNDBUF; never shrinks it; the kernel caps
   * it at net.core.wmem_max and reports twice what it grants): the size afterwards, -1 when `fd`
   * is no socket. Never throws. Absent before version 10.
   */
  growSendBuffer?(fd: number, bytes: number): number;
  /**
   * The zlib node:zlib uses (found by name in the process: inside the node binary, or the shared
   * libz Node links), as zlibVersion() gives it, e.g. "1.3.1"; undefined without one. Absent
   * before version 6.
   */
  zlibVersion?(): string | undefined;
  /**
   * Inflate the raw deflate stream of `src` into `into` (Z_SYNC_FLUSH, a zlib stream kept per
   * thread and reset per call, window of `windowBits`): the bytes written, or into.length + 1 when
   * the stream has more than fits. Throws (code ZLIB_ERROR, zlib's message) on bad data. Absent
   * before version 6.
   */
  inflateRaw?(src: Uint8Array, into: Uint8Array, windowBits: number): number;
  /**
   * Deflate `src` into `out` as one raw stream (Z_FINISH) with these parameters, on a stream kept
   * per thread: the bytes written, or -1 when `out` is too small. Absent before version 6.
   */
  deflateRaw?(src: Uint8Array, out: Uint8Array, level: number, windowBits: number, memLevel: number): number;
  /**
   * An AES sector cipher keyed with `key` on the OpenSSL inside the node binary: mode 0 CBC
   * (16/24/32-byte key), 1 XTS (32/64 bytes, both halves). Undefined when that OpenSSL or that
   * key size is not there, or for XTS keys whose halves are equal (OpenSSL refuses them). The
   * value is opaque: pass it to aesSectorsRun. Absent before version 8.
   */
  aesSectors?(mode: 0 | 1, key: Uint8Array): object | undefined;
  /**
   * Encrypt or decrypt the 512-byte sectors of `src` into `dst` (the same length; the same memory
   * or apart, never partly overlapping), each sector with its own IV: 16 bytes a sector from
   * `ivs`, or plain64 IVs counted from the sector number `ivs`. Absent before version 8.
   */
  aesSectorsRun?(cipher: object, encrypt: boolean, src: Uint8Array, dst: Uint8Array, ivs: Uint8Array | number): void;
  readonly version: number;
}

/** FALLOC_FL_* bits for `fallocate`. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

let loaded: { addon: HostAddon | undefined; why: string } | undefined;

function load(): { addon: HostAddon | undefined; why: string } {
  if (process.env.QCOW_NO_NATIVE === '1') return { addon: undefined, why: 'disabled by QCOW_NO_NATIVE=1' };
  // dist/host/native.node.js -> the package root's build/Release (node-gyp's output).
  const path = fileURLToPath(new URL('../../build/Release/qcow_host.node', import.meta.url));
  try {
    // process.dlopen directly: require() of a .node file resolves and wraps it first, which cost
    // ~2 ms of every command's start (0.45 ms this way).
    const mod = { exports: {} as HostAddon };
    process.dlopen(mod, path);
    return { addon: mod.exports, why: 'loaded' };
  } catch (e) {
    // Whether the file is there is asked only now: a stat before every load cost ~0.1 ms.
    if (!existsSync(path)) return { addon: undefined, why: 'not built' };
    return { addon: undefined, why: `not loadable: ${(e as Error).message.split('\n')[0]}` };
  }
}

/**
 * Take the addon a caller has already loaded from this package's build/Release, so that
 * hostAddon() does not find and load it a second time: bin/qcow.cjs loads it before the CLI's
 * bundle (to map the bundle with it), and the second load (the file's URL worked out from the
 * module's, a stat, dlopen and the addon's init again) cost ~0.4 ms of every command. Ignored once
 * the addon was looked for, and under QCOW_NO_NATIVE=1 (the launcher loads none then anyway).
 * Typed as a plain object so that the addon's interface stays out of the public API (qcow/node).
 * @internal for bin/qcow.cjs, through the CLI's entry.
 */
export function adoptHostAddon(addon: object): void {
  if (process.env.QCOW_NO_NATIVE === '1') return;
  loaded ??= { addon: addon as HostAddon, why: 'loaded' };
}

/** The addon, or undefined (see the top). Loaded once. */
export function hostAddon(): HostAddon | undefined {
  return (loaded ??= load()).addon;
}

/** Why the addon is or is not in use, for `qcow --version`. */
export function hostAddonStatus(): string {
  return (loaded ??= load()).why;
}
