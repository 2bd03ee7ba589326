/**
 * A local file through node:fs, with positional reads and writes.
 *
 * Small requests are done synchronously, large ones on libuv's thread pool. Handing a request to
 * the pool and back costs 20-40 µs of thread wake-ups (measured on a 2-core VM: 37 µs for an async
 * 4 KiB read against 1.8 µs for readSync, and 6 µs for a 64 KiB readSync), which is most of the cost
 * of a small guest request served from the page cache, where image files mostly live. Large
 * requests gain from the pool: the copy runs on another core while JavaScript goes on, and several
 * overlap. The price of the sync path is that a small read that misses the page cache holds the
 * event loop for one disk access; `syncMax: 0` sends everything to the pool.
 *
 * A server answering many large reads from the page cache (`qcow serve`) can ask for
 * `cachedReadsInline`: larger reads are then first tried synchronously with reads that never wait
 * for the disk (preadv2 RWF_NOWAIT, through the host addon), and only what the page cache lacks
 * goes to the pool. The pool's hand-off is then paid only for disk reads: serving 1 GiB over NBD in
 * 256 KiB reads, the thread wake-ups and the main thread's waits for the pool's lock had cost
 * more CPU than the copies (see nbd/commands.ts).
 *
 * Writes of 1 MiB and more go to the pool one at a time per file. Linux serialises buffered writes
 * to one file on the inode's lock, so a second write in flight gains nothing; worse, its thread
 * spins on the lock while the first copies (perf: 34% of a slow 1 GiB convert in
 * rwsem_spin_on_owner), and on a 2-core machine that spinning takes the core the copy needed.
 * qemu-img convert writes in order, one request at a time, too. Smaller writes
 * stay parallel: waiting for each one's completion to reach JavaScript before starting the next
 * (a round trip of ~50 us here) cost more than the spinning, and made 64 KiB writes 2x slower.
 *
 * A file written once front to back (convert's target) can ask for write-behind (writeBehind()):
 * each large write starts its own writeback when it ends, and the pages of the large writes a
 * window behind leave the page cache once they are clean. Later writes then take those pages
 * again instead of fresh ones. On our VMs that matters more than anything else in a 1 GiB
 * convert: the host takes back guest memory that has been free a while (free page reporting),
 * and the first touch of each such page costs the guest a host fault. A 1 GiB output filling the
 * page cache with such pages spent 1-2 s of system time (the copy into them) against 0.3 s for
 * pages in use before; with write-behind the output cycles through a window's worth of pages.
 * The writes never wait for these calls, and close() drops the ones still queued: where the disk
 * is slower than we write, pages are not clean yet and stay, as without write-behind.
 * It is not free: when fresh pages are warm (a quiet VM, or a machine without page reporting), a
 * 1 GiB raw -> qcow2 convert cost ~0.3 s more CPU with it than without (the writeback it submits,
 * the pages it frees); under load, without it cost 0.1-1 s more. A 1 GiB qcow2 -> raw copied
 * with copy_file_range spent ~0.7 s less with it, warm pages and quiet. Round eighteen in
 * docs/performance.md has the figures; choosing it in the run from what the first window's
 * writes cost is the open step.
 *
 * Opening, locking, fstat and closing are synchronous calls on a plain descriptor. They are
 * metadata calls the kernel answers at once, and a short command makes ~20 of them: as pool round
 * trips, each waking a thread in a process that has barely started, they took ~2 ms of the ~13 ms
 * our code spends on a 1 MiB convert to qcow2 (qemu-img does the whole job in ~8 ms). Only calls
 * that wait for the disk (fdatasync, truncate, closing a written file) or move data in bulk go to
 * the pool.
 */
import { close as fsClose, constants, fdatasync, fstatSync, ftruncate, ftruncateSync, openSync, closeSync, read as fsRead, readSync, statSync, statfsSync, unlinkSync, write as fsWrite, writeSync } from 'node:fs';
import { isAbsolute } from 'node:path';
import type { ByteStore, DataRun, StoreOpener } from './types.js';
import { hostAddon, type HostAddon } from '../host/native.node.js';
import * as sparse from '../host/sparse.node.js';
import { QcowError } from '../core/errors.js';
import { openImageLock, type ImageLock } from './lock.node.js';
import { permissionsFor, type Permissions } from './permissions.js';

/**
 * A local file as a {@link ByteStore}, locked as QEMU locks its images (so qcow and a running VM
 * or qemu-img do not write one image at once). `openImage` of `qcow/node` opens files with it;
 * open one yourself to hand it to a format directly.
 *
 * @example
 * ```ts
 * import { FileStore, rawFormat } from 'qcow/node';
 *
 * const store = await FileStore.open('disk.img', { readOnly: true });
 * const dev = await rawFormat.open(store, { readOnly: true });
 * console.log(dev.size, await store.allocatedSize());
 * await dev.close(); // closes the store too
 * ```
 */
export class FileStore implements ByteStore {
  /** The path as given to {@link FileStore.open}. */
  readonly name: string;
  /** Opened without write access. */
  readonly readOnly: boolean;
  private readonly fd: number;
  private closed = false;
  /** False under cache=unsafe (see skipFlushes). */
  private flushes = true;
  /**
   * Counts the calls that may have changed the file through this store: writes, truncates, holes,
   * fallocate, copies into it, its descriptor handed out for writing. flush() skips fdatasync when
   * none came since the last one (`flushedChanges`), as QEMU does (its flush returns at once when
   * nothing was written since the previous one), and close() of a file never changed stays off
   * the I/O pool: `qemu-io -c 'read 0 64k'` opens its image for writing and paid two fdatasync
   * calls and a pooled close for nothing, and with them the start of the pool's threads.
   */
  private changes = 0;
  /** `changes` when the last flush started. */
  private flushedChanges = 0;
  private lock: ImageLock | undefined;
  /** Requests of at most this many bytes are served synchronously (see above). */
  private readonly syncMax: number;
  /** Larger reads try the page cache inline first (see above); absent without the addon's call. */
  private cachedRead: HostAddon['preadNoWait'];
  /** The last write of SERIAL_WRITE_MIN or more handed to the pool: the next starts when it ends. */
  private writeTail: Promise<unknown> = Promise.resolve();
  /** [start, end) of the last run of data findDataRuns saw (see there). */
  private knownData: [number, number] | undefined;
  /** Set by writeThrough(): see there. */
  private syncEachWrite = false;
  /** Set by writeBehind(): see there. */
  private behind: WriteBehind | undefined;
  /** Set by writeInline(): every write is synchronous, whatever its size. */
  private inlineWrites = false;

  /** Sparse-file calls, present only where the host addon is loaded (see ByteStore). */
  readonly dataRuns?: (offset: number, length: number) => Promise<DataRun[]>;
  /** See ByteStore.dataKnownNow: inside the last run of data findDataRuns found. */
  readonly dataKnownNow?: (offset: number, length: number) => boolean;
  /** Deallocate host blocks (fallocate PUNCH_HOLE), when the host addon is loaded. */
  readonly punchHole?: (offset: number, length: number) => Promise<void>;
  /** Zero a range without writing it (fallocate ZERO_RANGE), when the host addon is loaded. */
  readonly zeroRange?: (offset: number, length: number) => Promise<void>;
  /** Reserve host blocks (fallocate), when the host addon is loaded. */
  readonly allocate?: (offset: number, length: number) => Promise<void>;
  /** Copy offload to another FileStore, present only where the addon has copy_file_range. */
  readonly copyTo?: (target: ByteStore, from: number, to: number, length: number) => Promise<number>;
  /** See ByteStore.directFd; present where the addon has the native copy loop. */
  readonly directFd?: (write: boolean) => number | undefined;
  /** Into a pipe with splice, present only where the addon has it. */
  readonly spliceTo?: (pipe: number, from: number, length: number) => Promise<number>;
  /** See ByteStore.sendCached; present where the addon has sendFileCached (dropped when the kernel cannot). */
  sendCached?: (socketFd: number, head: Uint8Array, offset: number, length: number) => number;
  /** See ByteStore.isCached; with sendCached. */
  readonly isCached?: (offset: number, length: number) => boolean;
  /** See ByteStore.readCachedNow; with cachedReadsInline. */
  readonly readCachedNow?: (offset: number, into: Uint8Array) => boolean;

  private constructor(name: string, fd: number, readOnly: boolean, syncMax: number, cachedReadsInline: boolean) {
    this.name = name;
    this.fd = fd;
    this.readOnly = readOnly;
    this.syncMax = syncMax;
    const addon = hostAddon();
    if (!addon) return;
    if (cachedReadsInline && addon.preadNoWait) {
      this.cachedRead = addon.preadNoWait;
      this.readCachedNow = (offset, into) => this.readCached(offset, into);
    }
    // Each is one system call that does not wait on data (lseek; fallocate updates extents only),
    // so it runs inline like the small reads above.
    this.dataRuns = (offset, length) => this.sync(() => this.findDataRuns(addon, offset, length));
    this.dataKnownNow = (offset, length) => {
      const known = this.knownData;
      return known !== undefined && length > 0 && offset >= known[0] && offset + length <= known[1];
    };
    const send = addon.sendFileCached;
    const cached = addon.rangeCached;
    if (send && cached) {
      this.sendCached = (socketFd, head, offset, length) => this.sendFile(send, socketFd, head, offset, length);
      this.isCached = (offset, length) => cached(this.fd, offset, length) === 1;
    }
    const copy = addon.copyFileRange;
    if (copy) this.copyTo = (target, from, to, length) => this.copyFileRange(copy, target, from, to, length);
    if (addon.copyExtents) {
      this.directFd = (write) => {
        if (this.closed || (write && (this.readOnly || this.syncEachWrite))) return undefined;
        if (write) this.changes++;
        return this.fd;
      };
    }
    const splice = addon.spliceToPipe;
    if (splice) this.spliceTo = (pipe, from, length) => this.spliceToPipe(splice, pipe, from, length);
    if (readOnly) return;
    this.punchHole = (offset, length) => this.sync(() => ((this.knownData = undefined), (this.changes++), sparse.punchHole(addon, this.fd, offset, length)));
    this.zeroRange = (offset, length) => this.sync(() => ((this.knownData = undefined), (this.changes++), sparse.zeroRange(addon, this.fd, offset, length)));
    this.allocate = (offset, length) => this.sync(() => ((this.changes++), sparse.allocate(addon, this.fd, offset, length)));
  }

  /**
   * The data runs of a range (SEEK_DATA / SEEK_HOLE, and fstat for the file's end). A server asks
   * this before every read (to send holes as holes), ~4096 times per GiB in 256 KiB pieces, and
   * the three system calls and the Stats object took ~20 us each time on our VM; so the last run
   * of data found, to the next hole, is kept, and a range inside it is answered from there. Only
   * this store's own calls that can make holes drop it; writes only ever turn holes into data.
   * (Another process punching holes meanwhile would have it answer data for them, which reads as
   * what they hold: their zeros.)
   */
  private findDataRuns(addon: HostAddon, offset: number, length: number): DataRun[] {
    if (this.dataKnownNow!(offset, length)) return [{ offset, length, data: true }];
    const runs = sparse.dataRuns(addon, this.fd, this.stat().size, offset, length);
    const last = runs[runs.length - 1];
    // A last run of data reaches the end of the range and may go on past it: one more call finds
    // how far (the next hole, or the end of the file).
    if (last?.data) this.knownData = [last.offset, addon.seekHole(this.fd, last.offset)];
    return runs;
  }

  private sendFile(send: NonNullable<HostAddon['sendFileCached']>, socketFd: number, head: Uint8Array, offset: number, length: number): number {
    const sent = send(socketFd, head, this.fd, offset, length);
    // -2: the kernel has no cachestat, or sendfile refuses these descriptors: stop asking.
    if (sent === -2) this.sendCached = undefined;
    return sent < 0 ? -1 : sent;
  }

  /** See ByteStore.readCachedNow: one read that never waits for the disk. */
  private readCached(offset: number, into: Uint8Array): boolean {
    const read = this.cachedRead;
    if (!read || into.length === 0) return false;
    try {
      const n = read(this.fd, into, offset);
      if (n === -2) this.cachedRead = undefined;
      // Short: part of the range is not cached, or the file ends first (read() adds the zeros).
      return n === into.length;
    } catch {
      // read() meets the error again and reports it.
      return false;
    }
  }

  /** See ByteStore.readNow: the rest of a sendCached reply, whose pages were cached a moment ago. */
  readNow(offset: number, into: Uint8Array): void {
    try {
      zeroTail(into, syncLoop(readSync, this.fd, into, offset));
    } catch (e) {
      throw fsError(e, this.name);
    }
  }

  /**
   * Run a host call; its failure becomes a QcowError naming the file. A filesystem without the
   * operation (EOPNOTSUPP) gives QCOW_UNSUPPORTED, on which callers fall back to writing zeros.
   */
  private sync<T>(call: () => T): Promise<T> {
    try {
      return Promise.resolve(call());
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EOPNOTSUPP') return Promise.reject(new QcowError('QCOW_UNSUPPORTED', 'the filesystem does not support this operation', { file: this.name, cause: e }));
      return Promise.reject(e instanceof QcowError ? e : fsError(e, this.name));
    }
  }

  /**
   * copy_file_range into another local file. It writes into `target` like a large write, so it
   * queues behind the target's other large writes (see SERIAL_WRITE_MIN above). Errors that mean
   * "not for these two files" (EXDEV on kernels before 5.3 or across some file systems, EINVAL,
   * ENOSYS, EOPNOTSUPP) become QCOW_UNSUPPORTED so the caller reads and writes instead.
   */
  private copyFileRange(copy: NonNullable<HostAddon['copyFileRange']>, target: ByteStore, from: number, to: number, length: number): Promise<number> {
    if (!(target instanceof FileStore)) return Promise.reject(new QcowError('QCOW_UNSUPPORTED', 'copy offload needs two local files', { file: target.name }));
    if (target.readOnly) return Promise.reject(new QcowError('QCOW_READ_ONLY', 'image is opened read-only', { file: target.name }));
    target.changes++;
    const start = () => copy(this.fd, from, target.fd, to, length).finally(() => target.changes++);
    const copied = target.writeTail.then(start).catch((e: unknown) => {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EXDEV' || code === 'EINVAL' || code === 'ENOSYS' || code === 'EOPNOTSUPP') {
        throw new QcowError('QCOW_UNSUPPORTED', `copy offload is not possible between these files (${code})`, { file: target.name, cause: e });
      }
      throw fsError(e, target.name);
    });
    target.writeTail = copied.catch(() => undefined);
    return copied;
  }

  /**
   * splice into a pipe. Errors of the file (EINVAL: a file system without splice, ENOSYS) become
   * QCOW_UNSUPPORTED so the caller reads and writes instead; the pipe's (EPIPE) are passed on as
   * they are, for the pipe's owner to word.
   */
  private spliceToPipe(splice: NonNullable<HostAddon['spliceToPipe']>, pipe: number, from: number, length: number): Promise<number> {
    return splice(this.fd, from, pipe, length).catch((e: unknown) => {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EINVAL' || code === 'ENOSYS' || code === 'EOPNOTSUPP') {
        throw new QcowError('QCOW_UNSUPPORTED', `cannot splice this file into a pipe (${code})`, { file: this.name, cause: e });
      }
      if (code === 'EPIPE') throw e;
      throw fsError(e, this.name);
    });
  }

  /**
   * Open a file and lock it as QEMU would (see lock.node.ts and permissions.ts): by default as an
   * image file holding metadata (qcow2's rules: a writer excludes every other user, a reader
   * excludes writers); `permissions` says otherwise, and `setPermissions` changes them once the
   * file's format and role are known. A conflict fails with QCOW_LOCKED; `create` truncates only
   * after the locks are held.
   */
  static async open(path: string, options: FileStoreOptions = {}): Promise<FileStore> {
    const readOnly = options.readOnly ?? false;
    let fd: number;
    try {
      // A file being created is not truncated yet: that waits until the lock is ours.
      fd = openSync(path, options.create ? constants.O_RDWR | constants.O_CREAT : readOnly ? 'r' : 'r+', 0o666);
    } catch (e) {
      throw fsError(e, path);
    }
    const store = new FileStore(path, fd, readOnly, options.syncMax ?? DEFAULT_SYNC_MAX, options.cachedReadsInline ?? false);
    try {
      if (!options.noLock) store.lock = openImageLock(fd, path, options.permissions ?? permissionsFor({ writable: !readOnly, format: 'qcow2', role: 'image' }));
      if (options.create) {
        store.changes++;
        ftruncateSync(fd, 0);
      }
    } catch (e) {
      store.lock?.release();
      closeSync(fd);
      throw e instanceof QcowError ? e : fsError(e, path);
    }
    return store;
  }

  /** Take other permissions (QCOW_LOCKED when another user conflicts; the old ones then stay). */
  setPermissions(p: Permissions): void {
    this.lock?.set(p);
  }

  async size(): Promise<number> {
    return this.stat().size;
  }

  async allocatedSize(): Promise<number> {
    return this.stat().blocks * 512;
  }

  private stat() {
    try {
      return fstatSync(this.fd);
    } catch (e) {
      throw fsError(e, this.name);
    }
  }

  // Failures become QcowError QCOW_IO naming the file (EIO, ENOSPC, EFBIG: one line for the user).
  // Reads and writes use fs.read/fs.write with callbacks on the FileHandle's fd: FileHandle.read
  // and .write cost noticeably more per call (an extra promise layer, a result object and handle
  // bookkeeping), which showed at a few µs per 4 KiB request. The handle still owns the fd.
  read(offset: number, into: Uint8Array): Promise<number> {
    if (into.length <= this.syncMax) {
      try {
        return Promise.resolve(zeroTail(into, syncLoop(readSync, this.fd, into, offset)));
      } catch (e) {
        return Promise.reject(fsError(e, this.name));
      }
    }
    let cached = 0;
    if (this.cachedRead) {
      try {
        cached = this.cachedRead(this.fd, into, offset);
      } catch (e) {
        return Promise.reject(fsError(e, this.name));
      }
      if (cached === into.length) return Promise.resolve(cached);
      // -2: this file has no such reads; -1: nothing cached at the start of the range.
      if (cached === -2) this.cachedRead = undefined;
      if (cached < 0) cached = 0;
    }
    // The rest (all of it without the inline try) on the pool; short at the end of the file.
    return asyncLoop(fsRead, this.fd, into.subarray(cached), offset + cached).then(
      (n) => zeroTail(into, cached + n),
      (e: unknown) => Promise.reject(fsError(e, this.name)),
    );
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) return Promise.reject(new QcowError('QCOW_READ_ONLY', 'image is opened read-only', { file: this.name }));
    if (this.syncEachWrite) return this.writeOnce(offset, data).then(() => this.flush());
    return this.writeOnce(offset, data);
  }

  private writeOnce(offset: number, data: Uint8Array): Promise<void> {
    this.changes++;
    if (data.length <= this.syncMax || this.inlineWrites) {
      try {
        this.whole(data, offset, syncLoop(writeSync, this.fd, data, offset));
        if (this.behind && data.length >= SERIAL_WRITE_MIN) this.behind.wrote(offset, data.length);
        return Promise.resolve();
      } catch (e) {
        return Promise.reject(e instanceof QcowError ? e : fsError(e, this.name));
      }
    }
    const start = () => asyncLoop(fsWrite, this.fd, data, offset);
    const serial = data.length >= SERIAL_WRITE_MIN;
    const written = (serial ? this.writeTail.then(start) : start()).then(
      // Counted again as it ends: a flush that started while it ran may not hold it.
      (n) => ((this.changes++), this.whole(data, offset, n)),
      (e: unknown) => Promise.reject(fsError(e, this.name)),
    );
    if (serial) {
      this.writeTail = written.catch(() => undefined);
      if (this.behind) written.then(() => this.behind?.wrote(offset, data.length), () => undefined);
    }
    return written;
  }

  /**
   * Write-behind for a file written once, front to back (see the top): from now on each write of
   * SERIAL_WRITE_MIN or more starts its writeback when it ends, and the pages of those writes that
   * lie `window` bytes of such writes behind leave the page cache once clean. The data and what
   * reads see are unchanged. False (and nothing changes) without the host addon's call, or for a
   * file in memory (tmpfs, ramfs): there the pages are the file, writeback has nothing to do and
   * DONTNEED drops nothing, so the ~2 calls per MiB were only pool round trips.
   */
  writeBehind(window = WRITE_BEHIND_WINDOW): boolean {
    const run = hostAddon()?.writeBehind;
    if (!run || this.readOnly || inMemory(this.name)) return false;
    this.behind ??= new WriteBehind((offset, length, dropOffset, dropLength) => run(this.fd, offset, length, dropOffset, dropLength), window);
    return true;
  }

  /**
   * From now on every write is synchronous, whatever its size: for a writer whose reads are
   * synchronous too (convert from standard input, streams/fd-source.node.ts), where the main
   * thread has nothing to do while a write runs on the pool but read the next bytes. From a pipe
   * that read then raced the pipe's writer (`cat`) for the pipe's lock: perf put 12% of a 1 GiB
   * convert in mutex_spin_on_owner under anon_pipe_read, and the pool's hand-offs cost ~6k futex
   * calls. Written inline, the writer refills the pipe while we write, and our next read finds it
   * full with the writer asleep. 1 GiB qcow2 from `cat` into /dev/shm: ~760 -> ~700 ms of our CPU
   * (5 alternating runs; into ext4 851 -> 771 ms, wall 2.1 -> 1.6 s).
   */
  writeInline(): void {
    this.inlineWrites = true;
  }

  /** See ByteStore.wroteDirectly: as writeOnce does after a large write. */
  wroteDirectly(offset: number, length: number): void {
    this.changes++;
    if (this.behind && length >= SERIAL_WRITE_MIN) this.behind.wrote(offset, length);
  }

  /** A write that moved fewer bytes than asked (the OS wrote nothing more) is an I/O error. */
  private whole(data: Uint8Array, offset: number, moved: number): void {
    if (moved < data.length) throw new QcowError('QCOW_IO', `short write: ${moved} of ${data.length} bytes at ${offset}`, { file: this.name });
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new QcowError('QCOW_READ_ONLY', 'image is opened read-only', { file: this.name });
    this.knownData = undefined;
    this.changes++;
    const wasEmpty = size > 0 && this.stat().size === 0;
    await new Promise<void>((resolve, reject) => ftruncate(this.fd, size, (e) => (e ? reject(fsError(e, this.name)) : resolve())));
    // QEMU's file protocol allocates the first block of a file it grows from empty (so that later
    // opens can probe the alignment there): a new raw image then has 4 KiB of data at its start,
    // which qemu-img map, measure and info's disk size show. Zeros, as the hole read before.
    if (wasEmpty) await this.write(0, new Uint8Array(Math.min(size, size < 4096 ? 512 : 4096)));
  }

  /**
   * From now on flush() does nothing: QEMU's cache=unsafe, which qemu-img convert uses for its
   * target by default (the kernel writes the data back when it will). Reads, writes and every
   * host call stay those of this file.
   */
  skipFlushes(): void {
    this.flushes = false;
  }

  /**
   * From now on each write resolves only once fdatasync has put it, and everything written before
   * it, on stable storage: qemu-img's `writethrough` and `directsync` cache modes, where a write
   * completes only when it would survive a power cut. QEMU gets there with a flush after every
   * write request too (its FUA emulation), not with O_DSYNC.
   */
  writeThrough(): void {
    this.syncEachWrite = true;
  }

  async flush(): Promise<void> {
    if (this.readOnly || !this.flushes || this.changes === this.flushedChanges) return;
    // Counted at the start: a write that lands while fdatasync runs may miss it, and is flushed by
    // the next flush. A failed flush counts as none.
    const upTo = this.changes;
    await new Promise<void>((resolve, reject) => fdatasync(this.fd, (e) => (e ? reject(fsError(e, this.name)) : resolve())));
    this.flushedChanges = Math.max(this.flushedChanges, upTo);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Before the close: once closed, the descriptor's number may already name another file.
    await this.behind?.settled();
    this.lock?.release();
    try {
      // A file we wrote may make close() wait for the file system (NFS writes back on close): on
      // the pool. One only read (opened read-only, or writable and never changed: see `changes`)
      // has nothing to write back, and a command that only read may not have started the pool at
      // all: starting its threads just to close cost more.
      if (this.readOnly || this.changes === 0) closeSync(this.fd);
      else await new Promise<void>((resolve, reject) => fsClose(this.fd, (e) => (e ? reject(fsError(e, this.name)) : resolve())));
    } catch (e) {
      throw e instanceof QcowError ? e : fsError(e, this.name);
    }
  }
}

/**
 * The bookkeeping of FileStore.writeBehind: the large writes done, oldest first, and one chain of
 * host calls (sync_file_range, fadvise) that the writes never wait for. The calls are advice:
 * their failures are dropped (the data is written either way; a real I/O error shows at the
 * flush, as without them). Exported for its tests only.
 */
export class WriteBehind {
  private readonly done: [number, number][] = [];
  private bytes = 0;
  /** Whether a window's worth of large writes has been seen, and the calls have begun. */
  private started = false;
  private tail: Promise<void> = Promise.resolve();
  private stopped = false;

  constructor(
    private readonly run: (offset: number, length: number, dropOffset: number, dropLength: number) => Promise<void>,
    private readonly window: number,
  ) {}

  /** A large write of [offset, +length) has ended. */
  wrote(offset: number, length: number): void {
    this.done.push([offset, length]);
    this.bytes += length;
    // Nothing until the output passes one window: a smaller file is written back by the kernel
    // as usual, after we exit. Starting writeback ourselves moves that work (block allocation,
    // submitting the I/O) into this process and makes close() wait on it: a 3 MiB convert paid
    // ~10 ms of CPU and wall for it (startup.js, 11 rounds). Past the window, the writes so far
    // are sent to writeback too, so that they are clean by the time they are to be dropped.
    if (!this.started) {
      if (this.bytes < this.window) return;
      this.started = true;
      for (const [o, n] of joined(this.done.slice(0, -1))) this.chain(() => this.run(o, n, 0, 0));
    }
    // What is more than `window` bytes of writes ago, joined where the ranges touch.
    const old: [number, number][] = [];
    while (this.bytes - this.done[0]![1] >= this.window) {
      const [o, n] = this.done.shift()!;
      this.bytes -= n;
      old.push([o, n]);
    }
    const [first, ...rest] = joined(old);
    this.chain(() => this.run(offset, length, first?.[0] ?? 0, first?.[1] ?? 0));
    // Length 0 would mean "to the end of the file" to sync_file_range: these only drop.
    for (const [o, n] of rest) this.chain(() => this.run(o, 0, o, n));
  }

  private chain(call: () => Promise<void>): void {
    this.tail = this.tail.then(() => (this.stopped ? undefined : call())).catch(() => undefined);
  }

  /**
   * Before the descriptor closes: the call under way ends, the ones still queued are dropped.
   * On a disk slower than our writes the queue is long (each call can wait for a free request),
   * and the kernel writes the rest back anyway: waiting for it would make close wait for the disk.
   */
  settled(): Promise<void> {
    this.stopped = true;
    return this.tail;
  }
}

/** Byte ranges in order, those that touch joined into one. */
/** tmpfs and ramfs (statfs f_type): file systems whose pages are the file itself. */
const IN_MEMORY_FS = new Set([0x01021994, 0x858458f6]);

/** Whether the file at `name` lives in memory; false when it cannot be told (the call is advice). */
function inMemory(name: string): boolean {
  try {
    return IN_MEMORY_FS.has(Number(statfsSync(name).type));
  } catch {
    return false;
  }
}

function joined(ranges: [number, number][]): [number, number][] {
  const out: [number, number][] = [];
  for (const [o, n] of ranges) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === o) last[1] += n;
    else out.push([o, n]);
  }
  return out;
}

// Positional reads and writes in as many calls as the OS needs, synchronously (small requests)
// or on libuv's pool (large ones): the count of bytes moved, short only at the end of the file.
type SyncIo = (fd: number, buf: Uint8Array, offset: number, length: number, position: number) => number;
type AsyncIo = (fd: number, buf: Uint8Array, offset: number, length: number, position: number, cb: (err: NodeJS.ErrnoException | null, n: number) => void) => void;

function syncLoop(op: SyncIo, fd: number, buf: Uint8Array, position: number): number {
  let done = 0;
  while (done < buf.length) {
    const n = op(fd, buf, done, buf.length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

function asyncLoop(op: AsyncIo, fd: number, buf: Uint8Array, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      op(fd, buf, done, buf.length - done, position + done, (err, n) => {
        if (err) return reject(err);
        done += n;
        if (n > 0 && done < buf.length) step();
        else resolve(done);
      });
    };
    step();
  });
}

/** Past the end of the file the image reads as zeros. */
function zeroTail(buf: Uint8Array, n: number): number {
  if (n < buf.length) buf.fill(0, n);
  return n;
}

/** Options of {@link FileStore.open}. */
export interface FileStoreOptions {
  /** Open without write access (and take a reader's locks). */
  readOnly?: boolean;
  /** Create the file when missing, and empty it (once the locks are held). */
  create?: boolean;
  /** Take no lock at all (devices such as /dev/full). */
  noLock?: boolean;
  /** The locks to take (see permissions.ts); default: an image file holding metadata. */
  permissions?: Permissions;
  /** Largest request served synchronously; 0: all on the thread pool. Default 64 KiB. */
  syncMax?: number;
  /**
   * Serve larger reads inline too, as far as the page cache holds them (never waiting for the
   * disk; the rest on the pool). Needs the host addon (version 8); ignored without it.
   */
  cachedReadsInline?: boolean;
}

const DEFAULT_SYNC_MAX = 64 * 1024;
/** Writes at least this large are started one after another per file (see the top). */
const SERIAL_WRITE_MIN = 1024 * 1024;
/** How far behind the last large write pages are dropped under write-behind (see the top). */
const WRITE_BEHIND_WINDOW = 64 * 1024 * 1024;

/** Turn an fs error into one line a user can act on. */
export function fsError(e: unknown, path: string): QcowError {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return new QcowError('QCOW_NOT_FOUND', 'No such file or directory', { file: path, cause: e });
  if (code === 'EACCES' || code === 'EPERM') return new QcowError('QCOW_IO', 'Permission denied', { file: path, cause: e });
  if (code === 'EISDIR') return new QcowError('QCOW_INVALID_ARGUMENT', 'Is a directory', { file: path, cause: e });
  return new QcowError('QCOW_IO', (e as Error).message ?? String(e), { file: path, cause: e });
}

/**
 * The {@link StoreOpener} of local files: opens them as {@link FileStore}s and resolves the names
 * an image records relative to the naming image's folder, as QEMU does.
 */
export const fileOpener: StoreOpener = {
  open: (name, options) => FileStore.open(name, options),
  // As QEMU's path_combine: keep the naming image's folder as it was written ("a/top.qcow2" names
  // "base" as "a/base"), so messages and info show the same paths qemu-img does.
  resolve: (name, relativeTo) => {
    // A name with QEMU's file protocol prefix ("file:PATH") is that path as written: QEMU does not
    // combine a name that says its protocol with the naming image's folder.
    if (name.startsWith('file:')) return name.slice('file:'.length);
    if (isAbsolute(name)) return name;
    const slash = relativeTo.lastIndexOf('/');
    return slash < 0 ? name : relativeTo.slice(0, slash + 1) + name;
  },
  remove: async (name) => unlinkSync(name),
  exists: async (name) => statSync(name, { throwIfNoEntry: false }) !== undefined,
};
