/*
 * qcow's host layer: the few system calls Node's fs module lacks, as a small N-API addon.
 *
 *   ofdLock(fd, start, length, type)  F_OFD_SETLK: type 0 unlock, 1 shared (read), 2 exclusive
 *                                     (write). Returns true, or false when another open file
 *                                     description holds a conflicting lock (EAGAIN/EACCES).
 *   ofdTest(fd, start, length, type)  F_OFD_GETLK: 0 when a lock of `type` could be taken, else
 *                                     the type of a conflicting lock (1 or 2).
 *   seekData(fd, offset)              lseek SEEK_DATA; -1 when there is no data past offset (ENXIO).
 *   seekHole(fd, offset)              lseek SEEK_HOLE.
 *   fallocate(fd, mode, offset, len)  fallocate(2); mode is the FALLOC_FL_* bits.
 *   copyFileRange(fdIn, offIn, fdOut, offOut, len)
 *                                     copy_file_range(2) until `len` bytes are copied or the
 *                                     source ends; a Promise of the bytes copied. Runs on libuv's
 *                                     thread pool: the kernel copies the data (or shares the
 *                                     blocks, on file systems that can), which takes time.
 *   copyExtents(buf, extents, count, dstFd, dstOffset, length, unit, flags, runs)
 *                                     The copy loop of one item of a plain convert into a raw
 *                                     file, on libuv's thread pool: see native/copy_loop.c.
 *   compareExtents(bufA, bufB, extA, countA, extB, countB, length, piece)
 *                                     The compare loop of one item of qemu-img compare, on
 *                                     libuv's thread pool: see native/compare_loop.c.
 *   spliceToPipe(fdIn, offIn, pipe, len)
 *                                     splice(2) [offIn, +len) of the file `fdIn` into the pipe
 *                                     `pipe` until `len` bytes are moved or the file ends; a
 *                                     Promise of the bytes moved, on libuv's thread pool (a full
 *                                     pipe waits for its reader there; a non-blocking pipe is
 *                                     waited on with poll). The pipe then holds references to the
 *                                     file's page-cache pages, not copies: no copy through our
 *                                     memory, the reader's read(2) is the one copy.
 *   writeBehind(fd, offset, length, dropOffset, dropLength)
 *                                     sync_file_range(SYNC_FILE_RANGE_WRITE) on [offset, +length):
 *                                     start writing those dirty pages back now, without waiting
 *                                     (none when length is 0);
 *                                     then posix_fadvise(DONTNEED) on [dropOffset, +dropLength)
 *                                     (when dropLength > 0): give back the pages of that range
 *                                     that are clean by now (dirty ones and ones under writeback
 *                                     stay). A Promise of undefined, on libuv's thread pool: the
 *                                     submission can wait for a free request on a busy disk.
 *   blockRunEnd(bytes, from, end, unit, zero)
 *                                     Over the blocks of `unit` bytes from `from` (the last one
 *                                     cut at `end`), where the run of blocks that are all zeros
 *                                     (`zero` true) or not all zeros (false) ends: the offset of
 *                                     the first block of the other kind, or `end`. The copy loops
 *                                     ask this once per run of a 2 MiB buffer, not once per block.
 *   contiguousEntries(table, index, max, clusterSize)
 *                                     The end (exclusive index) of the run of 8-byte big-endian
 *                                     qcow2 L2 entries from `index` (at most `max`) in which each
 *                                     is the one before plus `clusterSize`: formats/qcow2/
 *                                     l2-entry.ts's, in one call for a whole table slice.
 *   adviseHugePages(bytes)            madvise(MADV_HUGEPAGE) on the whole 2 MiB pages inside the
 *                                     array (anonymous memory: a WebAssembly memory). Returns the
 *                                     offset of the first one in the array, or -1 (none, or the
 *                                     kernel refused).
 *   mapText(path)                     The whole file as a string of its bytes (latin1) that V8
 *                                     reads in place from a read-only mapping of the file, or
 *                                     undefined where Node has no external strings (before 20.4).
 *   mapBytes(path)                    The whole file as a Buffer over a private (copy-on-write)
 *                                     mapping of it.
 *                                     Both are for the CLI's launcher (bin/qcow.cjs), which reads
 *                                     a bundle and its code cache at every start: a read() lands
 *                                     in fresh anonymous memory (and a string is one more copy),
 *                                     ~27 us per first-touched page on our VMs, while a mapping
 *                                     shares the page cache's pages, 16 of them per fault. The
 *                                     mapping lives as long as the value; like a shared library,
 *                                     the file must be replaced (rename), not rewritten in place.
 *   availableParallelism()            The CPUs this process may run on (sched_getaffinity), at
 *                                     least 1: node:os's figure, for the launcher, which would
 *                                     otherwise load node:os for it alone (~0.45 ms).
 *   zstdVersion()                     The system's libzstd (libzstd.so.1, loaded with dlopen on the
 *                                     first call) as ZSTD_versionNumber() gives it (10504 for
 *                                     1.5.4), or 0 when it cannot be loaded.
 *   zstdDecompress(src, into)         Decode the zstd frame(s) in `src` straight into `into` (both
 *                                     Uint8Arrays) with one decompression context per thread, kept
 *                                     for the thread's life; returns the bytes written. Throws an
 *                                     Error with code ZSTD_ERROR and zstd's own words for corrupt
 *                                     input or output that does not fit in `into`. The caller cuts
 *                                     `src` to one frame: zstd would go on into a next frame.
 *   readNoWait(fd, into)              One read at the file position that never waits
 *                                     (preadv2 with RWF_NOWAIT): the bytes read (0 at the end),
 *                                     -1 when it would have to wait (EAGAIN), -2 when the kernel
 *                                     does not offer RWF_NOWAIT for this descriptor.
 *   preadNoWait(fd, into, position)   The same at `position` (the file position unchanged): what a
 *                                     regular file's page cache holds is read at once, and the
 *                                     read stops short (-1 if nothing) where a disk access would
 *                                     have to wait. For large reads that would otherwise go to
 *                                     libuv's pool for nothing but a memory copy.
 *   sendFileCached(outFd, head, inFd, position, length)
 *                                     Reply with file bytes the kernel moves itself: when every
 *                                     page of [position, +length) of `inFd` is in the page cache
 *                                     (cachestat(2)), write `head` to the socket `outFd`
 *                                     (non-blocking), then sendfile(2) the range after it, until
 *                                     done or the socket is full (EAGAIN). The bytes sent, head
 *                                     included (the caller sends the rest its usual way); -1 when
 *                                     part of the range is not cached (nothing sent: sendfile
 *                                     would wait for the disk on the caller's thread); -2 when
 *                                     the kernel lacks cachestat (before 6.5) or sendfile refuses
 *                                     this pair of descriptors before anything was sent.
 *   rangeCached(fd, position, length) Whether every page of [position, +length) is in the page
 *                                     cache (cachestat(2)): 1 or 0; -2 when the kernel lacks
 *                                     cachestat (before 6.5). What sendFileCached checks, for a
 *                                     caller deciding before it queues such a reply.
 *   waitReadable(fd, timeoutMs)       poll(2) for POLLIN: true when a read would not wait (data,
 *                                     the end, or an error to report), false when the time ran
 *                                     out or a signal arrived (EINTR). For pipe readers (streams/
 *                                     fd-source.node.ts) that must let Node's event loop run its
 *                                     signal handlers while the writer is silent: a blocking
 *                                     read(2) would be restarted after the signal and wait on.
 *   growPipe(fd, bytes)               Ask for a pipe buffer of at least `bytes` (F_SETPIPE_SZ,
 *                                     never shrinking it; refused past
 *                                     /proc/sys/fs/pipe-max-size, 1 MiB by default, unless
 *                                     privileged): the buffer's size afterwards (F_GETPIPE_SZ), or
 *                                     -1 when `fd` is no pipe. Never throws: a larger buffer only
 *                                     saves wake-ups (fewer, larger reads of a pipe).
 *   growSendBuffer(fd, bytes)         Ask for a socket send buffer of at least `bytes`
 *                                     (SO_SNDBUF, never shrinking it; the kernel grants at most
 *                                     net.core.wmem_max, 208 KiB by default): the size getsockopt
 *                                     reports afterwards, -1 when `fd` is no socket. Never throws.
 *   zlibVersion()                     The zlib that node:zlib uses (inside the node binary, or the
 *                                     shared libz Node links), e.g. "1.3.1"; undefined without one.
 *   inflateRaw(src, into, windowBits) Inflate the raw deflate stream in `src` into `into`, the
 *                                     bytes node:zlib's inflateRaw gives (one zlib stream per
 *                                     thread, reset per call): the bytes written, or
 *                                     into.length + 1 when the stream has more to give than fits.
 *                                     Throws code ZLIB_ERROR with zlib's message on bad data.
 *   deflateRaw(src, out, level, windowBits, memLevel)
 *                                     Deflate `src` into `out` as one raw stream (Z_FINISH), with
 *                                     the same zlib and parameters node:zlib's createDeflateRaw
 *                                     would use, so the same bytes: their count, or -1 when `out`
 *                                     is too small.
 *   aesSectors(mode, key)             An AES sector cipher for `key` (mode 0: CBC with a 16, 24 or
 *                                     32-byte key; 1: XTS with both halves, 32 or 64 bytes) on the
 *                                     OpenSSL inside the process (node:crypto's), as an opaque
 *                                     value; undefined when there is no such OpenSSL or key size,
 *                                     or for XTS keys whose halves are equal (OpenSSL refuses them).
 *   aesSectorsRun(cipher, encrypt, src, dst, ivs)
 *                                     Encrypt or decrypt the 512-byte sectors of `src` into `dst`
 *                                     (the same length: the same memory, or apart), each with its
 *                                     own IV: 16 bytes a sector from the Uint8Array `ivs`, or
 *                                     plain64 IVs from the sector number `ivs`. Synchronous: a
 *                                     64 KiB cluster takes 20-35 us of AES-NI on our VMs.
 *
 * Other failures throw an Error with `code` (the errno name, as node:fs does) and `errno`.
 * Everything else here is synchronous: each call is a single non-blocking system call (fallocate can
 * take longer on some file systems; callers decide where to run it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <string.h>
#include <sched.h>
#include <dlfcn.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>
#include <node_api.h>
#include "pool_job.h"

#define CHECK(call)                                                                                \
  do {                                                                                             \
    if ((call) != napi_ok) return NULL;                                                            \
  } while (0)

/* An Error shaped like node:fs's: message "ENAME, strerror", `code`, `errno` (negative), `syscall`. */
static napi_value errno_error(napi_env env, int err, const char *syscall) {
  const char *name = "EIO";
  switch (err) {
    case EBADF: name = "EBADF"; break;
    case EINVAL: name = "EINVAL"; break;
    case ENOLCK: name = "ENOLCK"; break;
    case EOPNOTSUPP: name = "EOPNOTSUPP"; break;
    case ENOSPC: name = "ENOSPC"; break;
    case EFBIG: name = "EFBIG"; break;
    case ENODEV: name = "ENODEV"; break;
    case ESPIPE: name = "ESPIPE"; break;
    case ENXIO: name = "ENXIO"; break;
    case EPERM: name = "EPERM"; break;
    case EINTR: name = "EINTR"; break;
    case EDEADLK: name = "EDEADLK"; break;
    case EXDEV: name = "EXDEV"; break;
    case ENOSYS: name = "ENOSYS"; break;
    case EISDIR: name = "EISDIR"; break;
    case EOVERFLOW: name = "EOVERFLOW"; break;
    case ETXTBSY: name = "ETXTBSY"; break;
    case ENOENT: name = "ENOENT"; break;
    case EACCES: name = "EACCES"; break;
    case ENOMEM: name = "ENOMEM"; break;
    case ENAMETOOLONG: name = "ENAMETOOLONG"; break;
    /* The peer of a socket or pipe went away: named as Node names them, so callers treat the
       addon's writes (sendfile, splice) like Node's own and do not report a hang-up as EIO. */
    case EPIPE: name = "EPIPE"; break;
    case ECONNRESET: name = "ECONNRESET"; break;
    default: break;
  }
  char msg[160];
  snprintf(msg, sizeof msg, "%s, %s", name, strerror(err));
  napi_value code, message, error, errnum, sys;
  CHECK(napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code));
  CHECK(napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message));
  CHECK(napi_create_error(env, code, message, &error));
  CHECK(napi_create_int32(env, -err, &errnum));
  CHECK(napi_set_named_property(env, error, "errno", errnum));
  CHECK(napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &sys));
  CHECK(napi_set_named_property(env, error, "syscall", sys));
  return error;
}

/* For the other sources of the addon (copy_loop.c, compare_loop.c, pool_job.c). */
napi_value qcow_errno_error(napi_env env, int err, const char *syscall) { return errno_error(env, err, syscall); }
static int all_zero(const unsigned char *p, size_t n);
int qcow_all_zero(const unsigned char *p, size_t n) { return all_zero(p, n); }
/* copy_loop.c: the native copy loop of plain converts into raw (described there). */
napi_value qcow_copy_extents(napi_env env, napi_callback_info info);
/* compare_loop.c: the native compare loop of qemu-img compare (described there). */
napi_value qcow_compare_extents(napi_env env, napi_callback_info info);

static napi_value throw_errno(napi_env env, int err, const char *syscall) {
  napi_value error = errno_error(env, err, syscall);
  if (error) napi_throw(env, error);
  return NULL;
}

/* Read `n` numeric arguments (int32 for the first, exact integers as doubles for the rest). */
static int get_args(napi_env env, napi_callback_info info, size_t n, double *out) {
  napi_value argv[5];
  size_t argc = 5;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return 0;
  if (argc < n) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "missing arguments");
    return 0;
  }
  for (size_t i = 0; i < n; i++) {
    if (napi_get_value_double(env, argv[i], &out[i]) != napi_ok || out[i] != (double)(long long)out[i]) {
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "arguments must be integers");
      return 0;
    }
  }
  return 1;
}

static short lock_type(double t) { return t == 2 ? F_WRLCK : t == 1 ? F_RDLCK : F_UNLCK; }

static napi_value ofd_lock(napi_env env, napi_callback_info info) {
  double a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = lock_type(a[3]);
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)a[1];
  fl.l_len = (off_t)a[2];
  int r;
  do r = fcntl((int)a[0], F_OFD_SETLK, &fl);
  while (r == -1 && errno == EINTR);
  if (r == -1 && errno != EAGAIN && errno != EACCES) return throw_errno(env, errno, "fcntl");
  napi_value result;
  CHECK(napi_get_boolean(env, r == 0, &result));
  return result;
}

static napi_value ofd_test(napi_env env, napi_callback_info info) {
  double a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = lock_type(a[3]);
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)a[1];
  fl.l_len = (off_t)a[2];
  if (fcntl((int)a[0], F_OFD_GETLK, &fl) == -1) return throw_errno(env, errno, "fcntl");
  napi_value result;
  CHECK(napi_create_int32(env, fl.l_type == F_UNLCK ? 0 : fl.l_type == F_RDLCK ? 1 : 2, &result));
  return result;
}

static napi_value seek(napi_env env, napi_callback_info info, int whence) {
  double a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  off_t r = lseek((int)a[0], (off_t)a[1], whence);
  if (r == (off_t)-1 && errno != ENXIO) return throw_errno(env, errno, "lseek");
  napi_value result;
  CHECK(napi_create_double(env, r == (off_t)-1 ? -1 : (double)r, &result));
  return result;
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return seek(env, info, SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return seek(env, info, SEEK_HOLE); }

static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  double a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  int r;
  do r = fallocate((int)a[0], (int)a[1], (off_t)a[2], (off_t)a[3]);
  while (r == -1 && errno == EINTR);
  if (r == -1) return throw_errno(env, errno, "fallocate");
  napi_value result;
  CHECK(napi_get_undefined(env, &result));
  return result;
}

/* copy_file_range on the thread pool: the state of one call. */
typedef struct {
  qcow_pool_job base;
  int fd_in, fd_out;
  off_t off_in, off_out;
  size_t length;
  size_t copied;
} copy_job;

static void copy_execute(napi_env env, void *data) {
  (void)env;
  copy_job *job = data;
  while (job->copied < job->length) {
    /* The kernel copies at most about 2 GiB per call; loop for the rest. */
    ssize_t n = copy_file_range(job->fd_in, &job->off_in, job->fd_out, &job->off_out, job->length - job->copied, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      job->base.err = errno, job->base.err_fd = -1, job->base.syscall = "copy_file_range";
      return;
    }
    if (n == 0) break; /* the source ended: the caller fills the rest */
    job->copied += (size_t)n;
  }
  job->base.result = (double)job->copied;
}

static napi_value copy_file_range_async(napi_env env, napi_callback_info info) {
  double a[5];
  if (!get_args(env, info, 5, a)) return NULL;
  if (a[1] < 0 || a[3] < 0 || a[4] < 0) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "offsets and length must not be negative");
    return NULL;
  }
  copy_job *job = qcow_pool_job_alloc(env, sizeof *job);
  if (!job) return NULL;
  job->fd_in = (int)a[0];
  job->off_in = (off_t)a[1];
  job->fd_out = (int)a[2];
  job->off_out = (off_t)a[3];
  job->length = (size_t)a[4];
  return qcow_pool_queue(env, &job->base, "copyFileRange", NULL, 0, copy_execute);
}

/* splice from a file into a pipe on the thread pool: the state of one call. */
typedef struct {
  qcow_pool_job base;
  int fd_in, pipe;
  off_t off_in;
  size_t length;
  size_t moved;
} splice_job;

static void splice_execute(napi_env env, void *data) {
  (void)env;
  splice_job *job = data;
  while (job->moved < job->length) {
    ssize_t n = splice(job->fd_in, &job->off_in, job->pipe, NULL, job->length - job->moved, SPLICE_F_MORE);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        /* Someone made the pipe non-blocking (Node does for process.stdout): wait for room. */
        struct pollfd p = {job->pipe, POLLOUT, 0};
        if (poll(&p, 1, -1) >= 0 || errno == EINTR) continue;
      }
      /* What was moved is in the pipe already: report it, so the caller goes on from there
         (the next call fails at once and reports the error). */
      if (job->moved > 0) break;
      job->base.err = errno, job->base.err_fd = -1, job->base.syscall = "splice";
      return;
    }
    if (n == 0) break; /* the file ended: the caller sends the rest */
    job->moved += (size_t)n;
  }
  job->base.result = (double)job->moved;
}

static napi_value splice_to_pipe(napi_env env, napi_callback_info info) {
  double a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  if (a[1] < 0 || a[3] < 0) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "offset and length must not be negative");
    return NULL;
  }
  splice_job *job = qcow_pool_job_alloc(env, sizeof *job);
  if (!job) return NULL;
  job->fd_in = (int)a[0];
  job->off_in = (off_t)a[1];
  job->pipe = (int)a[2];
  job->length = (size_t)a[3];
  return qcow_pool_queue(env, &job->base, "spliceToPipe", NULL, 0, splice_execute);
}

/* sync_file_range + fadvise DONTNEED on the thread pool: the state of one call. */
typedef struct {
  qcow_pool_job base;
  int fd;
  off_t offset, length, drop_offset, drop_length;
} behind_job;

static void behind_execute(napi_env env, void *data) {
  (void)env;
  behind_job *job = data;
  int r = 0;
  /* Length 0 would mean "to the end of the file": a call that only drops does no writeback. */
  if (job->length > 0) {
    do r = sync_file_range(job->fd, job->offset, job->length, SYNC_FILE_RANGE_WRITE);
    while (r == -1 && errno == EINTR);
  }
  if (r == -1) {
    job->base.err = errno, job->base.err_fd = job->fd, job->base.syscall = "sync_file_range";
    return;
  }
  if (job->drop_length <= 0) return;
  /* posix_fadvise returns the error number instead of setting errno. */
  r = posix_fadvise(job->fd, job->drop_offset, job->drop_length, POSIX_FADV_DONTNEED);
  if (r != 0) {
    job->base.err = r, job->base.err_fd = job->fd, job->base.syscall = "posix_fadvise";
  }
}

static napi_value write_behind(napi_env env, napi_callback_info info) {
  double a[5];
  if (!get_args(env, info, 5, a)) return NULL;
  if (a[1] < 0 || a[2] < 0 || a[3] < 0 || a[4] < 0) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "offsets and lengths must not be negative");
    return NULL;
  }
  behind_job *job = qcow_pool_job_alloc(env, sizeof *job);
  if (!job) return NULL;
  job->fd = (int)a[0];
  job->offset = (off_t)a[1];
  job->length = (off_t)a[2];
  job->drop_offset = (off_t)a[3];
  job->drop_length = (off_t)a[4];
  return qcow_pool_queue(env, &job->base, "writeBehind", NULL, 0, behind_execute);
}

/* True when the `n` bytes at `p` are all zeros. Data mostly shows in its first word, so that is
 * looked at first; a zero block is then read in 64-byte steps of ORed words (no branch per word),
 * through memcpy so any alignment is fine (compilers make it a plain load). */
static int all_zero(const unsigned char *p, size_t n) {
  size_t i = 0;
  uint64_t w;
  if (n >= 8) {
    memcpy(&w, p, 8);
    if (w) return 0;
    i = 8;
  }
  for (; i + 64 <= n; i += 64) {
    uint64_t a[8];
    memcpy(a, p + i, 64);
    if ((a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7]) != 0) return 0;
  }
  for (; i + 8 <= n; i += 8) {
    memcpy(&w, p + i, 8);
    if (w) return 0;
  }
  for (; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

static napi_value block_run_end(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  size_t argc = 5;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  bool is_typed = false;
  if (argc < 5 || napi_is_typedarray(env, argv[0], &is_typed) != napi_ok || !is_typed) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "blockRunEnd(bytes: Uint8Array, from, end, unit, zero)");
    return NULL;
  }
  napi_typedarray_type type;
  size_t length;
  void *data;
  CHECK(napi_get_typedarray_info(env, argv[0], &type, &length, &data, NULL, NULL));
  double from, end, unit;
  bool zero;
  if (type != napi_uint8_array || napi_get_value_double(env, argv[1], &from) != napi_ok || napi_get_value_double(env, argv[2], &end) != napi_ok ||
      napi_get_value_double(env, argv[3], &unit) != napi_ok || napi_get_value_bool(env, argv[4], &zero) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "blockRunEnd(bytes: Uint8Array, from, end, unit, zero)");
    return NULL;
  }
  if (!(from >= 0 && from <= end && end <= (double)length && unit >= 1) || from != (double)(size_t)from || end != (double)(size_t)end || unit != (double)(size_t)unit) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "blockRunEnd: need 0 <= from <= end <= length and unit >= 1, all integers");
    return NULL;
  }
  const unsigned char *bytes = data;
  size_t o = (size_t)from, e = (size_t)end, u = (size_t)unit;
  /* Data blocks are told apart by their first bytes, one cache line per block: lines 4 KiB apart
   * that the kernel has just written from another core, which the hardware does not prefetch
   * across pages. Asking for them a few blocks ahead overlaps the misses (a miss per block in turn
   * cost ~100 ns, 26 ms per GiB). */
  const size_t ahead = 8 * u;
  for (size_t p = o; p < e && p < o + ahead; p += u) __builtin_prefetch(bytes + p);
  while (o < e) {
    if (o + ahead < e) __builtin_prefetch(bytes + o + ahead);
    size_t n = e - o < u ? e - o : u;
    if (all_zero(bytes + o, n) != zero) break;
    o += n;
  }
  napi_value result;
  CHECK(napi_create_double(env, (double)o, &result));
  return result;
}

/* See contiguousEntries at the top. */
static napi_value contiguous_entries(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  size_t argc = 4;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  bool is_typed = false;
  napi_typedarray_type type;
  size_t length = 0;
  void *data = NULL;
  double index, max, cluster;
  if (argc < 4 || napi_is_typedarray(env, argv[0], &is_typed) != napi_ok || !is_typed ||
      napi_get_typedarray_info(env, argv[0], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array ||
      napi_get_value_double(env, argv[1], &index) != napi_ok || napi_get_value_double(env, argv[2], &max) != napi_ok ||
      napi_get_value_double(env, argv[3], &cluster) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "contiguousEntries(table: Uint8Array, index, max, clusterSize)");
    return NULL;
  }
  /* Whole numbers, the first entry and `max` entries from it inside the table. */
  if (!(index >= 0 && max >= 1 && cluster >= 0 && cluster < 9007199254740992.0) || index != (double)(size_t)index || max != (double)(size_t)max ||
      cluster != (double)(uint64_t)cluster || (size_t)index + (size_t)max > length / 8) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "contiguousEntries: need whole numbers, max >= 1 and index + max entries inside the table");
    return NULL;
  }
  const unsigned char *p = (const unsigned char *)data + (size_t)index * 8;
  size_t n = (size_t)max, k = 1;
  uint64_t step = (uint64_t)cluster, first;
  memcpy(&first, p, 8);
  first = __builtin_bswap64(first);
  /* Entry k is the first plus k clusters, wrapping as 64-bit words do (as the JavaScript does). */
  for (uint64_t want = first + step; k < n; k++, want += step) {
    uint64_t e;
    memcpy(&e, p + k * 8, 8);
    if (__builtin_bswap64(e) != want) break;
  }
  napi_value result;
  CHECK(napi_create_double(env, (double)((size_t)index + k), &result));
  return result;
}

/* See adviseHugePages at the top. */
static napi_value advise_huge_pages(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  bool is_typed = false;
  napi_typedarray_type type;
  size_t length;
  void *data;
  if (argc < 1 || napi_is_typedarray(env, argv[0], &is_typed) != napi_ok || !is_typed ||
      napi_get_typedarray_info(env, argv[0], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "adviseHugePages(bytes: Uint8Array)");
    return NULL;
  }
  const uintptr_t huge = (uintptr_t)2 << 20;
  uintptr_t start = ((uintptr_t)data + huge - 1) & ~(huge - 1);
  uintptr_t end = ((uintptr_t)data + length) & ~(huge - 1);
  double at = -1;
  if (end > start && madvise((void *)start, end - start, MADV_HUGEPAGE) == 0) at = (double)(start - (uintptr_t)data);
  napi_value result;
  CHECK(napi_create_double(env, at, &result));
  return result;
}

/*
 * Node's external strings: node_api_create_external_string_latin1 is in Node 20.4 and later, still
 * behind NAPI_EXPERIMENTAL in its headers (which would make the whole addon an experimental-version
 * one). So it is declared here, weakly: where the running Node lacks it, it is NULL and mapText
 * returns undefined.
 */
extern napi_status NAPI_CDECL node_api_create_external_string_latin1(napi_env env, char *str, size_t length,
                                                                     napi_finalize finalize_callback,
                                                                     void *finalize_hint, napi_value *result,
                                                                     bool *copied) __attribute__((weak));

/* Finalizer of a mapping made by map_file: the hint is its length. */
static void unmap(napi_env env, void *data, void *hint) {
  (void)env;
  munmap(data, (size_t)(uintptr_t)hint);
}

/*
 * Map the whole file named by `arg` (PROT_READ, plus PROT_WRITE when `writable`; always
 * MAP_PRIVATE, so writes stay in this process). Sets *data (NULL for an empty file, which cannot
 * be mapped) and *length; returns 0 after throwing.
 */
static int map_file(napi_env env, napi_value arg, bool writable, size_t max, void **data, size_t *length) {
  char path[4096];
  size_t n;
  napi_valuetype t;
  if (napi_typeof(env, arg, &t) != napi_ok || t != napi_string) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "the path must be a string");
    return 0;
  }
  if (napi_get_value_string_utf8(env, arg, path, sizeof path, &n) != napi_ok) return 0;
  if (n >= sizeof path - 1) {
    throw_errno(env, ENAMETOOLONG, "open");
    return 0;
  }
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw_errno(env, errno, "open");
    return 0;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    throw_errno(env, err, "fstat");
    return 0;
  }
  if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size > max) {
    close(fd);
    throw_errno(env, S_ISDIR(st.st_mode) ? EISDIR : !S_ISREG(st.st_mode) ? ENODEV : EFBIG, "mmap");
    return 0;
  }
  *length = (size_t)st.st_size;
  *data = NULL;
  if (*length > 0) {
    void *p = mmap(NULL, *length, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      close(fd);
      throw_errno(env, err, "mmap");
      return 0;
    }
    *data = p;
  }
  close(fd);
  return 1;
}

/* See mapText at the top. */
static napi_value map_text(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  napi_value result;
  if (node_api_create_external_string_latin1 == NULL) {
    CHECK(napi_get_undefined(env, &result));
    return result;
  }
  if (argc < 1) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "mapText(path: string)");
    return NULL;
  }
  void *data;
  size_t length;
  /* V8's strings are at most 2^29 - 24 characters long on 64-bit machines. */
  if (!map_file(env, argv[0], false, ((size_t)1 << 29) - 24, &data, &length)) return NULL;
  if (data == NULL) {
    CHECK(napi_create_string_latin1(env, "", 0, &result));
    return result;
  }
  /* Node copies instead (and calls the finalizer at once) where V8's sandbox forbids external data. */
  if (node_api_create_external_string_latin1(env, data, length, unmap, (void *)(uintptr_t)length, &result, NULL) != napi_ok) {
    munmap(data, length);
    return NULL;
  }
  return result;
}

/* See mapBytes at the top. */
static napi_value map_bytes(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "mapBytes(path: string)");
    return NULL;
  }
  void *data;
  size_t length;
  if (!map_file(env, argv[0], true, (size_t)1 << 32, &data, &length)) return NULL;
  napi_value result;
  if (data == NULL) {
    void *none;
    CHECK(napi_create_buffer(env, 0, &none, &result));
    return result;
  }
  if (napi_create_external_buffer(env, length, data, unmap, (void *)(uintptr_t)length, &result) != napi_ok) {
    munmap(data, length);
    return NULL;
  }
  return result;
}

/* See availableParallelism at the top. */
static napi_value available_parallelism(napi_env env, napi_callback_info info) {
  (void)info;
  cpu_set_t set;
  int n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 0;
  if (n < 1) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    n = online > 0 ? (int)online : 1;
  }
  napi_value result;
  CHECK(napi_create_int32(env, n, &result));
  return result;
}

/*
 * zstd through the system's libzstd, loaded at run time: its headers are often not installed
 * (Debian's libzstd1 has only the library; dpkg itself depends on it), and a build that linked it
 * would fail to load where it is missing. These few functions are zstd's stable API, declared here
 * with the types of zstd.h (size_t results; errors are values ZSTD_isError recognises).
 */
typedef struct zstd_dctx zstd_dctx;
static struct {
  int ok; /* libzstd loaded, with every function below */
  unsigned version;
  zstd_dctx *(*create_dctx)(void);
  size_t (*free_dctx)(zstd_dctx *);
  size_t (*decompress_dctx)(zstd_dctx *, void *, size_t, const void *, size_t);
  unsigned (*is_error)(size_t);
  const char *(*error_name)(size_t);
  unsigned (*version_number)(void);
} zstd;
/* Worker threads load the addon too: the first load of libzstd is made once, for all of them. */
static pthread_once_t zstd_once = PTHREAD_ONCE_INIT;

static void zstd_load(void) {
  void *lib = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return;
  *(void **)&zstd.create_dctx = dlsym(lib, "ZSTD_createDCtx");
  *(void **)&zstd.free_dctx = dlsym(lib, "ZSTD_freeDCtx");
  *(void **)&zstd.decompress_dctx = dlsym(lib, "ZSTD_decompressDCtx");
  *(void **)&zstd.is_error = dlsym(lib, "ZSTD_isError");
  *(void **)&zstd.error_name = dlsym(lib, "ZSTD_getErrorName");
  *(void **)&zstd.version_number = dlsym(lib, "ZSTD_versionNumber");
  if (!zstd.create_dctx || !zstd.free_dctx || !zstd.decompress_dctx || !zstd.is_error || !zstd.error_name || !zstd.version_number) {
    dlclose(lib);
    return;
  }
  zstd.version = zstd.version_number();
  /* Frames of the 1.x format are what QEMU writes; a library older than 1.0 is not worth trusting. */
  zstd.ok = zstd.version >= 10000;
}

/*
 * zlib as node:zlib runs it: the zlib Node is built with exports its functions under their own
 * names (addons link against them; for a Node built against the system's shared libz, that library
 * is in the process's global scope instead). Looked up with RTLD_DEFAULT and never loaded by us,
 * so it is the code node:zlib calls: a cluster deflated here is the same bytes as one deflated
 * through node:zlib with the same parameters (`convert -c` output must not depend on whether the
 * addon is built). Not the Cr_z_-prefixed copy some node binaries also carry (Debian's: Chromium's
 * zlib 1.2.13 inside V8, beside node:zlib's 1.3.1), whose deflate gives other bytes; the caller
 * also checks zlibVersion() against process.versions.zlib. Why not node:zlib itself: loading it
 * (with node:stream) and making a stream cost a small convert ~4 ms. z_stream's layout and these
 * functions are zlib's stable ABI (zlib.h), declared here as Node's headers do not promise zlib.h.
 */
typedef struct {
  const unsigned char *next_in;
  unsigned avail_in;
  unsigned long total_in;
  unsigned char *next_out;
  unsigned avail_out;
  unsigned long total_out;
  const char *msg;
  void *state;
  void *zalloc, *zfree, *opaque;
  int data_type;
  unsigned long adler;
  unsigned long reserved;
} z_stream_abi;
enum { Z_OK_ = 0, Z_STREAM_END_ = 1, Z_BUF_ERROR_ = -5, Z_FINISH_ = 4, Z_DEFLATED_ = 8 };
static struct {
  int ok;
  const char *(*version)(void);
  int (*inflate_init2)(z_stream_abi *, int, const char *, int);
  int (*inflate)(z_stream_abi *, int);
  int (*inflate_reset)(z_stream_abi *);
  int (*inflate_end)(z_stream_abi *);
  int (*deflate_init2)(z_stream_abi *, int, int, int, int, int, const char *, int);
  int (*deflate)(z_stream_abi *, int);
  int (*deflate_reset)(z_stream_abi *);
  int (*deflate_end)(z_stream_abi *);
} zlib;
static pthread_once_t zlib_once = PTHREAD_ONCE_INIT;

/* Look `sym` up in the process (node's own zlib and OpenSSL) into `table.field`; on a miss the
 * loader returns at once and `table.ok` stays 0, so callers fall back. Shared by the loaders below. */
#define LOAD_SYM(table, field, sym)                                                                \
  *(void **)&table.field = dlsym(RTLD_DEFAULT, sym);                                               \
  if (!table.field) return;

static void zlib_load(void) {
  LOAD_SYM(zlib, version, "zlibVersion")
  LOAD_SYM(zlib, inflate_init2, "inflateInit2_")
  LOAD_SYM(zlib, inflate, "inflate")
  LOAD_SYM(zlib, inflate_reset, "inflateReset")
  LOAD_SYM(zlib, inflate_end, "inflateEnd")
  LOAD_SYM(zlib, deflate_init2, "deflateInit2_")
  LOAD_SYM(zlib, deflate, "deflate")
  LOAD_SYM(zlib, deflate_reset, "deflateReset")
  LOAD_SYM(zlib, deflate_end, "deflateEnd")
  /* zlib 1.x: the z_stream above is its layout (the Init functions check its size and the major version). */
  zlib.ok = zlib.version()[0] == '1';
}

/*
 * What each thread's Node environment (the main one, each codec worker) keeps for its life, freed
 * with the environment: a zstd context (~100 KiB of tables) and a zlib stream each way (deflate's
 * ~270 KiB at memLevel 9), set up once rather than per cluster.
 */
typedef struct {
  zstd_dctx *dctx;
  z_stream_abi *inf;
  int inf_bits;
  z_stream_abi *def;
  int def_level, def_bits, def_mem;
} codec_state;

/* A kept stream is ended and freed when its parameters change and with the thread's state. */
static void zstream_drop(int (*end)(z_stream_abi *), z_stream_abi **z) {
  if (!*z) return;
  end(*z);
  free(*z);
  *z = NULL;
}

/* A zeroed stream for inflateInit2/deflateInit2, or NULL with ENOMEM thrown. */
static z_stream_abi *zstream_alloc(napi_env env) {
  z_stream_abi *z = calloc(1, sizeof *z);
  if (!z) napi_throw_error(env, "ENOMEM", "out of memory");
  return z;
}

/* After an init call: true when it succeeded; otherwise the stream is freed and `what` thrown. */
static bool zstream_started(napi_env env, z_stream_abi *z, int r, const char *what) {
  if (r == Z_OK_) return true;
  free(z);
  napi_throw_error(env, "ZLIB_ERROR", what);
  return false;
}

static void free_state(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  codec_state *st = data;
  if (!st) return;
  if (st->dctx) zstd.free_dctx(st->dctx);
  zstream_drop(zlib.inflate_end, &st->inf);
  zstream_drop(zlib.deflate_end, &st->def);
  free(st);
}

static codec_state *state_of(napi_env env) {
  codec_state *st = NULL;
  if (napi_get_instance_data(env, (void **)&st) != napi_ok) return NULL;
  if (st) return st;
  st = calloc(1, sizeof *st);
  if (!st) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  if (napi_set_instance_data(env, st, free_state, NULL) != napi_ok) {
    free(st);
    return NULL;
  }
  return st;
}

static napi_value zstd_version(napi_env env, napi_callback_info info) {
  (void)info;
  pthread_once(&zstd_once, zstd_load);
  napi_value result;
  CHECK(napi_create_uint32(env, zstd.ok ? zstd.version : 0, &result));
  return result;
}

static int get_bytes(napi_env env, napi_value v, void **data, size_t *length) {
  bool is_typed = false;
  napi_typedarray_type type;
  return napi_is_typedarray(env, v, &is_typed) == napi_ok && is_typed && napi_get_typedarray_info(env, v, &type, length, data, NULL, NULL) == napi_ok &&
         type == napi_uint8_array;
}

/* A codec call's arguments: two Uint8Arrays (src, dst), then `nints` int32s. False when they are
 * not that: the caller throws its own usage line (codec_usage). */
static bool codec_args(napi_env env, napi_callback_info info, void **src, size_t *src_len, void **dst, size_t *dst_len, int32_t *ints, size_t nints) {
  napi_value argv[5];
  size_t argc = 5;
  if (nints > 3 || napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 + nints) return false;
  if (!get_bytes(env, argv[0], src, src_len) || !get_bytes(env, argv[1], dst, dst_len)) return false;
  for (size_t i = 0; i < nints; i++)
    if (napi_get_value_int32(env, argv[2 + i], &ints[i]) != napi_ok) return false;
  return true;
}

static napi_value codec_usage(napi_env env, const char *line) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", line);
  return NULL;
}

/* The calling thread's codec state once the library is loaded (`load` run once, `*ok` its
 * outcome), or NULL with an exception pending (`missing` says which library is not there). */
static codec_state *codec_ready(napi_env env, pthread_once_t *once, void (*load)(void), const int *ok, const char *missing) {
  pthread_once(once, load);
  if (!*ok) {
    napi_throw_error(env, "ENOENT", missing);
    return NULL;
  }
  return state_of(env);
}

static napi_value zstd_decompress(napi_env env, napi_callback_info info) {
  void *src, *dst;
  size_t src_len, dst_len;
  if (!codec_args(env, info, &src, &src_len, &dst, &dst_len, NULL, 0)) return codec_usage(env, "zstdDecompress(src: Uint8Array, into: Uint8Array)");
  codec_state *st = codec_ready(env, &zstd_once, zstd_load, &zstd.ok, "libzstd.so.1 could not be loaded");
  if (!st) return NULL;
  if (!st->dctx) {
    st->dctx = zstd.create_dctx();
    if (!st->dctx) {
      napi_throw_error(env, "ENOMEM", "ZSTD_createDCtx failed");
      return NULL;
    }
  }
  zstd_dctx *dctx = st->dctx;
  /* An empty view may have no memory behind it; zstd wants a valid pointer even for 0 bytes. */
  static unsigned char none;
  size_t r = zstd.decompress_dctx(dctx, dst_len ? dst : &none, dst_len, src_len ? src : &none, src_len);
  if (zstd.is_error(r)) {
    napi_throw_error(env, "ZSTD_ERROR", zstd.error_name(r));
    return NULL;
  }
  napi_value result;
  CHECK(napi_create_double(env, (double)r, &result));
  return result;
}

/* preadv2(RWF_NOWAIT) at `pos` (-1: the file position): bytes read, -1 for EAGAIN, -2 when
 * the kernel has no non-waiting reads for this descriptor, or NULL after throwing. */
static napi_value nowait_read(napi_env env, int fd, void *buf, size_t len, off_t pos) {
  static unsigned char none;
  struct iovec iov = {len ? buf : &none, len};
  ssize_t r;
  do r = preadv2(fd, &iov, 1, pos, RWF_NOWAIT);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN) r = -1;
    /* Kernels before 4.14 (EINVAL) or descriptors without non-waiting reads (EOPNOTSUPP). */
    else if (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS) r = -2;
    else return throw_errno(env, errno, "preadv2");
  }
  napi_value result;
  CHECK(napi_create_double(env, (double)r, &result));
  return result;
}

static napi_value read_nowait(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  void *buf;
  size_t len;
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || !get_bytes(env, argv[1], &buf, &len)) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "readNoWait(fd: number, into: Uint8Array)");
    return NULL;
  }
  return nowait_read(env, fd, buf, len, -1);
}

static napi_value pread_nowait(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  size_t argc = 3;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  void *buf;
  size_t len;
  double pos;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || !get_bytes(env, argv[1], &buf, &len) ||
      napi_get_value_double(env, argv[2], &pos) != napi_ok || pos < 0 || pos != (double)(long long)pos) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "preadNoWait(fd: number, into: Uint8Array, position: number)");
    return NULL;
  }
  return nowait_read(env, fd, buf, len, (off_t)pos);
}

/* cachestat(2) (Linux 6.5), declared here: older C libraries and headers lack it. */
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct qcow_cachestat_range {
  uint64_t off, len;
};
struct qcow_cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

/* 1: every page of the range is in the page cache; 0: some are not; -1: no cachestat. */
static int range_cached(int fd, off_t pos, size_t len) {
  static long page;
  if (!page) page = sysconf(_SC_PAGESIZE);
  if (len == 0) return 1;
  struct qcow_cachestat_range range = {(uint64_t)pos, len};
  struct qcow_cachestat cs;
  if (syscall(__NR_cachestat, fd, &range, &cs, 0) != 0) return -1;
  uint64_t pages = ((uint64_t)pos + len + page - 1) / page - (uint64_t)pos / page;
  return cs.nr_cache >= pages;
}

static napi_value range_cached_js(napi_env env, napi_callback_info info) {
  double a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  if (a[1] < 0 || a[2] < 0) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "rangeCached: negative position or length");
    return NULL;
  }
  int r = range_cached((int)a[0], (off_t)a[1], (size_t)a[2]);
  napi_value result;
  CHECK(napi_create_int32(env, r < 0 ? -2 : r, &result));
  return result;
}

static napi_value send_file_cached(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  size_t argc = 5;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t out, in;
  void *head;
  size_t head_len;
  double pos, len;
  if (argc < 5 || napi_get_value_int32(env, argv[0], &out) != napi_ok || !get_bytes(env, argv[1], &head, &head_len) ||
      napi_get_value_int32(env, argv[2], &in) != napi_ok || napi_get_value_double(env, argv[3], &pos) != napi_ok ||
      napi_get_value_double(env, argv[4], &len) != napi_ok || pos < 0 || pos != (double)(long long)pos || len < 0 ||
      len != (double)(long long)len) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "sendFileCached(outFd: number, head: Uint8Array, inFd: number, position: number, length: number)");
    return NULL;
  }
  double sent = 0;
  int cached = range_cached(in, (off_t)pos, (size_t)len);
  if (cached <= 0) sent = cached < 0 ? -2 : -1;
  else {
    size_t done = 0;
    while (done < head_len) {
      ssize_t n = write(out, (char *)head + done, head_len - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) break;
      if (n < 0) return throw_errno(env, errno, "write");
      done += (size_t)n;
    }
    sent = (double)done;
    off_t at = (off_t)pos;
    size_t left = (size_t)len;
    while (done == head_len && left > 0) {
      ssize_t n = sendfile(out, in, &at, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) break;
      /* Descriptors sendfile does not take: -2 when nothing went out yet, else the caller sends
         the rest (the stream already holds the head) its usual way. */
      if (n < 0 && (errno == EINVAL || errno == ENOSYS)) {
        if (sent == 0) sent = -2;
        break;
      }
      if (n < 0) return throw_errno(env, errno, "sendfile");
      if (n == 0) break; /* the file ended: the caller sends the rest (zeros) */
      left -= (size_t)n;
      sent += (double)n;
    }
  }
  napi_value result;
  CHECK(napi_create_double(env, sent, &result));
  return result;
}

static napi_value wait_readable(napi_env env, napi_callback_info info) {
  double a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  struct pollfd p = {(int)a[0], POLLIN, 0};
  int r = poll(&p, 1, (int)a[1]);
  if (r < 0 && errno != EINTR) return throw_errno(env, errno, "poll");
  napi_value result;
  CHECK(napi_get_boolean(env, r > 0, &result));
  return result;
}

static napi_value grow_send_buffer(napi_env env, napi_callback_info info) {
  double a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  int fd = (int)a[0];
  int want = a[1] > 0x10000000 ? 0x10000000 : (int)a[1];
  int size = -1;
  socklen_t len = sizeof size;
  /* Never shrinks. The kernel caps the request at net.core.wmem_max (and doubles what it
     grants, for its bookkeeping): what getsockopt reports afterwards is the answer. */
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, &len) == 0 && size < want && setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof want) == 0) {
    len = sizeof size;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, &len) != 0) size = -1;
  }
  napi_value result;
  CHECK(napi_create_int32(env, size, &result));
  return result;
}

static napi_value grow_pipe(napi_env env, napi_callback_info info) {
  double a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  int fd = (int)a[0];
  int want = a[1] > 0x40000000 ? 0x40000000 : (int)a[1];
  int r = fcntl(fd, F_GETPIPE_SZ);
  /* Never shrinks a pipe someone made larger. Refused (EPERM past pipe-max-size or the user's
     pipe pages): the size stays as it was, which is still correct. */
  if (r >= 0 && r < want && fcntl(fd, F_SETPIPE_SZ, want) >= 0) r = fcntl(fd, F_GETPIPE_SZ);
  napi_value result;
  CHECK(napi_create_int32(env, r < 0 ? -1 : r, &result));
  return result;
}

static napi_value zlib_version(napi_env env, napi_callback_info info) {
  (void)info;
  pthread_once(&zlib_once, zlib_load);
  napi_value result;
  if (!zlib.ok) {
    CHECK(napi_get_undefined(env, &result));
    return result;
  }
  CHECK(napi_create_string_utf8(env, zlib.version(), NAPI_AUTO_LENGTH, &result));
  return result;
}

/* zlib's message for a failed call (node:zlib reports the same words), with code ZLIB_ERROR. */
static napi_value throw_zlib(napi_env env, z_stream_abi *z, int ret) {
  char msg[128];
  if (z->msg) snprintf(msg, sizeof msg, "%s", z->msg);
  else snprintf(msg, sizeof msg, "zlib error %d", ret);
  napi_throw_error(env, "ZLIB_ERROR", msg);
  return NULL;
}

/* One inflate call: Z_OK, Z_BUF_ERROR (no progress possible) and Z_STREAM_END are not errors.
 * Returns zlib's result. Z_FINISH where node:zlib's handle passes Z_SYNC_FLUSH: the same bytes
 * and the same errors, but a stream that ends within the call (every cluster's, as a rule) is not
 * copied into the sliding window afterwards. With Z_SYNC_FLUSH, zlib copied the last 32 KiB of
 * each 64 KiB cluster into its window (updatewindow), ~16k instructions a cluster, almost as many
 * as the inflate itself for text. A stream cut short by a full output keeps its window as before
 * (zlib keeps it whenever the stream has not ended), so the probe below reads on from there. */
static int inflate_step(z_stream_abi *z, const unsigned char *in, size_t in_len, unsigned char *out, size_t out_len) {
  static unsigned char none;
  z->next_in = in_len ? in : &none;
  z->avail_in = (unsigned)in_len;
  z->next_out = out_len ? out : &none;
  z->avail_out = (unsigned)out_len;
  return zlib.inflate(z, Z_FINISH_);
}

static int inflate_failed(int r) { return r != Z_OK_ && r != Z_BUF_ERROR_ && r != Z_STREAM_END_; }

static napi_value zlib_inflate_raw(napi_env env, napi_callback_info info) {
  void *src, *dst;
  size_t src_len, dst_len;
  int32_t bits = 0;
  if (!codec_args(env, info, &src, &src_len, &dst, &dst_len, &bits, 1) || bits < 8 || bits > 15 || src_len > 0xffffffffu || dst_len >= 0xffffffffu)
    return codec_usage(env, "inflateRaw(src: Uint8Array, into: Uint8Array, windowBits: 8..15)");
  codec_state *st = codec_ready(env, &zlib_once, zlib_load, &zlib.ok, "no zlib in this process");
  if (!st) return NULL;
  if (st->inf && st->inf_bits != bits) zstream_drop(zlib.inflate_end, &st->inf);
  if (!st->inf) {
    z_stream_abi *z = zstream_alloc(env);
    if (!z || !zstream_started(env, z, zlib.inflate_init2(z, -bits, zlib.version(), (int)sizeof *z), "inflateInit2 failed")) return NULL;
    st->inf = z;
    st->inf_bits = bits;
  } else {
    zlib.inflate_reset(st->inf);
  }
  z_stream_abi *z = st->inf;
  int r = inflate_step(z, src, src_len, dst, dst_len);
  if (inflate_failed(r)) return throw_zlib(env, z, r);
  size_t filled = dst_len - z->avail_out;
  if (filled == dst_len) {
    /* The cluster is full: one byte of room says whether the stream has more to give. */
    unsigned char probe;
    size_t used = src_len - z->avail_in;
    r = inflate_step(z, (const unsigned char *)src + used, src_len - used, &probe, 1);
    if (inflate_failed(r)) return throw_zlib(env, z, r);
    if (z->avail_out == 0) filled = dst_len + 1;
  }
  napi_value result;
  CHECK(napi_create_double(env, (double)filled, &result));
  return result;
}

static napi_value zlib_deflate_raw(napi_env env, napi_callback_info info) {
  void *src, *dst;
  size_t src_len, dst_len;
  int32_t p[3] = {0, 0, 0}; /* level, windowBits, memLevel */
  if (!codec_args(env, info, &src, &src_len, &dst, &dst_len, p, 3) || p[0] < 0 || p[0] > 9 || p[1] < 9 || p[1] > 15 || p[2] < 1 || p[2] > 9 ||
      src_len > 0xffffffffu || dst_len > 0xffffffffu)
    return codec_usage(env, "deflateRaw(src: Uint8Array, out: Uint8Array, level: 0..9, windowBits: 9..15, memLevel: 1..9)");
  int32_t level = p[0], bits = p[1], mem = p[2];
  codec_state *st = codec_ready(env, &zlib_once, zlib_load, &zlib.ok, "no zlib in this process");
  if (!st) return NULL;
  if (st->def && (st->def_level != level || st->def_bits != bits || st->def_mem != mem)) zstream_drop(zlib.deflate_end, &st->def);
  if (!st->def) {
    z_stream_abi *z = zstream_alloc(env);
    /* As node:zlib's createDeflateRaw: negative windowBits for a raw stream, default strategy. */
    if (!z || !zstream_started(env, z, zlib.deflate_init2(z, level, Z_DEFLATED_, -bits, mem, 0, zlib.version(), (int)sizeof *z), "deflateInit2 failed")) return NULL;
    st->def = z;
    st->def_level = level;
    st->def_bits = bits;
    st->def_mem = mem;
  } else {
    zlib.deflate_reset(st->def);
  }
  z_stream_abi *z = st->def;
  static unsigned char none;
  z->next_in = src_len ? src : &none;
  z->avail_in = (unsigned)src_len;
  z->next_out = dst_len ? dst : &none;
  z->avail_out = (unsigned)dst_len;
  int r = zlib.deflate(z, Z_FINISH_);
  napi_value result;
  if (r == Z_STREAM_END_) {
    CHECK(napi_create_double(env, (double)(dst_len - z->avail_out), &result));
  } else if (r == Z_OK_ || r == Z_BUF_ERROR_) {
    /* `out` was too small for the whole stream. */
    CHECK(napi_create_int32(env, -1, &result));
  } else {
    return throw_zlib(env, z, r);
  }
  return result;
}

/*
 * AES sector ciphers (CBC and XTS over 512-byte sectors, one IV per sector) with the OpenSSL that
 * node:crypto runs: the node binary exports libcrypto's EVP functions (or links a shared libcrypto
 * whose symbols are global), so they are looked up by name with RTLD_DEFAULT, as zlib is above,
 * and never loaded by us. OpenSSL's own CBC and XTS (AES-NI, several blocks in flight) do the
 * whole mode in one pass, where the JavaScript fallback needs an ECB pass plus word XOR passes
 * and copies around it. EVP's ABI (opaque contexts, these six calls) is stable across OpenSSL 1.1
 * and 3; declared here as Node's headers do not promise OpenSSL's.
 */
typedef struct evp_cipher_st evp_cipher;
typedef struct evp_cipher_ctx_st evp_cipher_ctx;
static struct {
  int ok;
  evp_cipher_ctx *(*ctx_new)(void);
  void (*ctx_free)(evp_cipher_ctx *);
  int (*init)(evp_cipher_ctx *, const evp_cipher *, void *engine, const unsigned char *key, const unsigned char *iv, int enc);
  int (*update)(evp_cipher_ctx *, unsigned char *out, int *outl, const unsigned char *in, int inl);
  int (*set_padding)(evp_cipher_ctx *, int pad);
  const evp_cipher *(*cbc[3])(void); /* AES-128, -192, -256 */
  const evp_cipher *(*xts[2])(void); /* AES-128-XTS (32-byte key), AES-256-XTS (64) */
} evp;
static pthread_once_t evp_once = PTHREAD_ONCE_INIT;

static void evp_load(void) {
  LOAD_SYM(evp, ctx_new, "EVP_CIPHER_CTX_new")
  LOAD_SYM(evp, ctx_free, "EVP_CIPHER_CTX_free")
  LOAD_SYM(evp, init, "EVP_CipherInit_ex")
  LOAD_SYM(evp, update, "EVP_CipherUpdate")
  LOAD_SYM(evp, set_padding, "EVP_CIPHER_CTX_set_padding")
  LOAD_SYM(evp, cbc[0], "EVP_aes_128_cbc")
  LOAD_SYM(evp, cbc[1], "EVP_aes_192_cbc")
  LOAD_SYM(evp, cbc[2], "EVP_aes_256_cbc")
  LOAD_SYM(evp, xts[0], "EVP_aes_128_xts")
  LOAD_SYM(evp, xts[1], "EVP_aes_256_xts")
  evp.ok = 1;
}

#define AES_SECTOR 512
#define AES_IV 16

/* One key's cipher: a context per direction, keyed on first use (decrypt-only users never pay
 * for the encryption key schedule). Only the JavaScript thread that made it uses it. */
typedef struct {
  const evp_cipher *cipher;
  int cbc;
  size_t key_len;
  unsigned char key[64];
  evp_cipher_ctx *ctx[2]; /* [0] decrypt, [1] encrypt */
} aes_sectors;

static void aes_sectors_free(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  aes_sectors *a = data;
  for (int i = 0; i < 2; i++)
    if (a->ctx[i]) evp.ctx_free(a->ctx[i]);
  /* The key is secret: wipe it in a way the compiler may not drop. */
  volatile unsigned char *k = a->key;
  for (size_t i = 0; i < sizeof a->key; i++) k[i] = 0;
  free(a);
}

/* aesSectors(mode, key): see the top. */
static napi_value aes_sectors_new(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t mode;
  void *key;
  size_t key_len;
  if (argc < 2 || napi_get_value_int32(env, argv[0], &mode) != napi_ok || (mode != 0 && mode != 1) || !get_bytes(env, argv[1], &key, &key_len))
    return codec_usage(env, "aesSectors(mode: 0 (CBC) | 1 (XTS), key: Uint8Array)");
  pthread_once(&evp_once, evp_load);
  napi_value result;
  const evp_cipher *cipher = NULL;
  if (evp.ok && mode == 0 && (key_len == 16 || key_len == 24 || key_len == 32)) cipher = evp.cbc[(key_len - 16) / 8]();
  /* OpenSSL refuses XTS keys whose halves are equal (when encrypting): the fallback takes them. */
  if (evp.ok && mode == 1 && (key_len == 32 || key_len == 64) && memcmp(key, (unsigned char *)key + key_len / 2, key_len / 2) != 0)
    cipher = evp.xts[key_len == 64]();
  if (!cipher) {
    CHECK(napi_get_undefined(env, &result));
    return result;
  }
  aes_sectors *a = calloc(1, sizeof *a);
  if (!a) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  a->cipher = cipher;
  a->cbc = mode == 0;
  a->key_len = key_len;
  memcpy(a->key, key, key_len);
  if (napi_create_external(env, a, aes_sectors_free, NULL, &result) != napi_ok) {
    aes_sectors_free(env, a, NULL);
    return NULL;
  }
  return result;
}

/* Sector i's plain64 IV (the little-endian u64 first + i, then zeros) into `iv`, when no IVs were given. */
static void aes_sector_iv(unsigned char iv[AES_IV], const void *ivs, size_t i, uint64_t first) {
  if (ivs) return;
  uint64_t v = first + i;
  for (int b = 0; b < 8; b++) iv[b] = (unsigned char)(v >> (8 * b));
  memset(iv + 8, 0, 8);
}

static napi_value aes_usage(napi_env env) {
  return codec_usage(env, "aesSectorsRun(cipher, encrypt: boolean, src: Uint8Array, dst: Uint8Array, ivs: Uint8Array | firstSector: number)");
}

/* aesSectorsRun(cipher, encrypt, src, dst, ivs): see the top. */
static napi_value aes_sectors_run(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  size_t argc = 5;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  aes_sectors *a;
  bool enc;
  void *src, *dst, *ivs = NULL;
  size_t src_len, dst_len, ivs_len = 0;
  napi_valuetype iv_type;
  if (argc < 5 || napi_get_value_external(env, argv[0], (void **)&a) != napi_ok || napi_get_value_bool(env, argv[1], &enc) != napi_ok ||
      !get_bytes(env, argv[2], &src, &src_len) || !get_bytes(env, argv[3], &dst, &dst_len) || napi_typeof(env, argv[4], &iv_type) != napi_ok)
    return aes_usage(env);
  size_t n = src_len / AES_SECTOR;
  double first = 0;
  if (iv_type == napi_number) {
    /* plain64 IVs from the first sector's number: no IV buffer built in JavaScript. */
    if (napi_get_value_double(env, argv[4], &first) != napi_ok || !(first >= 0) || first != (double)(uint64_t)first || first + (double)n > 9007199254740991.0)
      return aes_usage(env);
  } else if (!get_bytes(env, argv[4], &ivs, &ivs_len) || ivs_len != n * AES_IV) {
    return aes_usage(env);
  }
  if (src_len % AES_SECTOR != 0 || dst_len != src_len) return aes_usage(env);
  /* In place or apart: OpenSSL allows the two to be the same, not to overlap otherwise. */
  const unsigned char *s = src;
  unsigned char *d = dst;
  if (s != d && s < d + dst_len && d < s + src_len) return aes_usage(env);
  evp_cipher_ctx **ctx = &a->ctx[enc ? 1 : 0];
  if (!*ctx) {
    evp_cipher_ctx *c = evp.ctx_new();
    if (!c || evp.init(c, a->cipher, NULL, a->key, NULL, enc ? 1 : 0) != 1) {
      if (c) evp.ctx_free(c);
      napi_throw_error(env, "CRYPTO_ERROR", "OpenSSL could not set up the AES sector cipher");
      return NULL;
    }
    evp.set_padding(c, 0);
    *ctx = c;
  }
  uint64_t sector = (uint64_t)first;
  unsigned char iv[AES_IV];
  if (a->cbc && !enc) {
    /* CBC decryption of sector k needs only its IV and its own ciphertext, so a run of sectors
     * is deciphered as ONE chain from the first sector's IV (setting an IV costs OpenSSL 3 more
     * than the sector's AES-NI work): every later sector's first block then came out XORed with
     * the previous sector's last ciphertext block instead of its own IV, which is XORed back
     * here. Those blocks are kept first, as an in-place call overwrites them. */
    enum { RUN = 256 };
    unsigned char last[RUN][AES_IV];
    for (size_t i = 0; i < n; i += RUN) {
      size_t m = n - i < RUN ? n - i : RUN;
      const unsigned char *rs = s + i * AES_SECTOR;
      unsigned char *rd = d + i * AES_SECTOR;
      for (size_t k = 0; k + 1 < m; k++) memcpy(last[k], rs + k * AES_SECTOR + AES_SECTOR - AES_IV, AES_IV);
      aes_sector_iv(iv, ivs, i, sector);
      int outl = 0;
      if (evp.init(*ctx, NULL, NULL, NULL, ivs ? (const unsigned char *)ivs + i * AES_IV : iv, -1) != 1 ||
          evp.update(*ctx, rd, &outl, rs, (int)(m * AES_SECTOR)) != 1 || outl != (int)(m * AES_SECTOR)) {
        napi_throw_error(env, "CRYPTO_ERROR", "OpenSSL failed on AES sectors");
        return NULL;
      }
      for (size_t k = 1; k < m; k++) {
        const unsigned char *own = ivs ? (const unsigned char *)ivs + (i + k) * AES_IV : (aes_sector_iv(iv, NULL, i + k, sector), iv);
        unsigned char *b = rd + k * AES_SECTOR;
        for (int j = 0; j < AES_IV; j++) b[j] ^= last[k - 1][j] ^ own[j];
      }
    }
    return NULL;
  }
  for (size_t i = 0; i < n; i++, s += AES_SECTOR, d += AES_SECTOR) {
    aes_sector_iv(iv, ivs, i, sector);
    int outl = 0;
    if (evp.init(*ctx, NULL, NULL, NULL, ivs ? (const unsigned char *)ivs + i * AES_IV : iv, -1) != 1 || evp.update(*ctx, d, &outl, s, AES_SECTOR) != 1 ||
        outl != AES_SECTOR) {
      napi_throw_error(env, "CRYPTO_ERROR", "OpenSSL failed on an AES sector");
      return NULL;
    }
  }
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"ofdLock", NULL, ofd_lock, NULL, NULL, NULL, napi_enumerable, NULL},
    {"ofdTest", NULL, ofd_test, NULL, NULL, NULL, napi_enumerable, NULL},
    {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
    {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
    {"fallocate", NULL, do_fallocate, NULL, NULL, NULL, napi_enumerable, NULL},
    {"copyFileRange", NULL, copy_file_range_async, NULL, NULL, NULL, napi_enumerable, NULL},
    {"copyExtents", NULL, qcow_copy_extents, NULL, NULL, NULL, napi_enumerable, NULL},
    {"compareExtents", NULL, qcow_compare_extents, NULL, NULL, NULL, napi_enumerable, NULL},
    {"spliceToPipe", NULL, splice_to_pipe, NULL, NULL, NULL, napi_enumerable, NULL},
    {"writeBehind", NULL, write_behind, NULL, NULL, NULL, napi_enumerable, NULL},
    {"blockRunEnd", NULL, block_run_end, NULL, NULL, NULL, napi_enumerable, NULL},
    {"contiguousEntries", NULL, contiguous_entries, NULL, NULL, NULL, napi_enumerable, NULL},
    {"adviseHugePages", NULL, advise_huge_pages, NULL, NULL, NULL, napi_enumerable, NULL},
    {"mapText", NULL, map_text, NULL, NULL, NULL, napi_enumerable, NULL},
    {"mapBytes", NULL, map_bytes, NULL, NULL, NULL, napi_enumerable, NULL},
    {"availableParallelism", NULL, available_parallelism, NULL, NULL, NULL, napi_enumerable, NULL},
    {"zstdVersion", NULL, zstd_version, NULL, NULL, NULL, napi_enumerable, NULL},
    {"zstdDecompress", NULL, zstd_decompress, NULL, NULL, NULL, napi_enumerable, NULL},
    {"readNoWait", NULL, read_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
    {"preadNoWait", NULL, pread_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
    {"rangeCached", NULL, range_cached_js, NULL, NULL, NULL, napi_enumerable, NULL},
    {"sendFileCached", NULL, send_file_cached, NULL, NULL, NULL, napi_enumerable, NULL},
    {"waitReadable", NULL, wait_readable, NULL, NULL, NULL, napi_enumerable, NULL},
    {"growPipe", NULL, grow_pipe, NULL, NULL, NULL, napi_enumerable, NULL},
    {"growSendBuffer", NULL, grow_send_buffer, NULL, NULL, NULL, napi_enumerable, NULL},
    {"zlibVersion", NULL, zlib_version, NULL, NULL, NULL, napi_enumerable, NULL},
    {"inflateRaw", NULL, zlib_inflate_raw, NULL, NULL, NULL, napi_enumerable, NULL},
    {"deflateRaw", NULL, zlib_deflate_raw, NULL, NULL, NULL, napi_enumerable, NULL},
    {"aesSectors", NULL, aes_sectors_new, NULL, NULL, NULL, napi_enumerable, NULL},
    {"aesSectorsRun", NULL, aes_sectors_run, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  napi_value version;
  CHECK(napi_create_int32(env, 11, &version));
  CHECK(napi_set_named_property(env, exports, "version", version));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
