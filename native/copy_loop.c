/*
 * The copy loop of a plain convert into a raw file, for one work item, on libuv's thread pool
 * (src/ops/native-copy.ts drives it; the TypeScript loop in ops/convert.ts does the same job where
 * this is not loaded, and the two must write the same bytes and leave the same holes).
 *
 *   copyExtents(buf, extents, count, dstFd, dstOffset, length, unit, flags, runs)
 *     Move one item of `length` bytes into the file `dstFd` at `dstOffset`. `extents` (a
 *     Float64Array) holds `count` triples [srcFd, srcOffset, bytes] that cover the item in order;
 *     srcFd -1 is a range the source reported as zeros (never read). `buf` (a Uint8Array of at
 *     least `length` bytes) is the lane's copy buffer: the call allocates nothing.
 *     The item is worked through in pieces of about 1 MiB (whole blocks of `unit` bytes), each
 *     read, scanned and written before the next, so the bytes are still in the core's cache when
 *     they are scanned and written out again. The write decisions are those of convert.ts's
 *     chunkWrites for a target without backing file and without compression:
 *       flags & 2 (-S 0): every byte is written;
 *       else blocks of `unit` bytes that are all zeros are not written, and the rest is written in
 *       runs; with flags & 1 (the target reads as zeros already) that is all, otherwise (-n into
 *       an existing file) the zero blocks are reported for the caller to make zero.
 *     A Promise of the number of records put into `runs` (a Float64Array), each a triple [kind,
 *     offset, bytes] in target offsets, neighbours of one kind joined: kind 1 data written, kind 0
 *     zeros left for the caller. `runs` must hold 3 x (length / unit + 2) numbers.
 *     Reads past a source's end read zeros. A failure rejects with an Error carrying `code` (the
 *     errno name), `syscall` ("pread" or "pwrite") and `fd`, the descriptor that failed; what was
 *     written before it stays written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>
#include "pool_job.h"

/* qcow_host.c's zero scan (blockRunEnd's): 1 when the n bytes at p are all zero. */
int qcow_all_zero(const unsigned char *p, size_t n);

/* About the size of a core's L2 cache share: a piece is read, scanned and written while there. */
#define PIECE (1024 * 1024)

typedef struct {
  qcow_pool_job base;
  unsigned char *buf;
  const double *ext;
  size_t count;
  int dst;
  int64_t dst_off;
  size_t length, unit;
  int flags;
  double *runs;
  size_t nruns, max_runs;
} loop_job;

static void record(loop_job *job, int kind, size_t from, size_t to) {
  double *last = job->nruns ? job->runs + 3 * (job->nruns - 1) : NULL;
  double off = (double)(job->dst_off + (int64_t)from);
  if (last && last[0] == kind && last[1] + last[2] == off) {
    last[2] += (double)(to - from);
    return;
  }
  if (job->nruns == job->max_runs) return; /* cannot happen: the caller sized `runs` */
  double *r = job->runs + 3 * job->nruns++;
  r[0] = kind;
  r[1] = off;
  r[2] = (double)(to - from);
}

static int write_at(loop_job *job, size_t from, size_t to) {
  size_t done = from;
  while (done < to) {
    ssize_t r = pwrite(job->dst, job->buf + done, to - done, (off_t)(job->dst_off + (int64_t)done));
    if (r < 0) {
      if (errno == EINTR) continue;
      job->base.err = errno, job->base.err_fd = job->dst, job->base.syscall = "pwrite";
      return 0;
    }
    if (r == 0) {
      job->base.err = EIO, job->base.err_fd = job->dst, job->base.syscall = "pwrite";
      return 0;
    }
    done += (size_t)r;
  }
  return 1;
}

/* Fill [p, pe) of the buffer: data extents read, zero extents set to zero except (`sparse`) the
 * whole blocks inside them, which are never looked at. */
static int fill_piece(loop_job *job, size_t p, size_t pe, int sparse) {
  size_t at = 0;
  for (size_t i = 0; i < job->count && at < pe; i++) {
    const double *e = job->ext + 3 * i;
    size_t s = at, n = (size_t)e[2], end = s + n;
    at = end;
    if (end <= p) continue;
    size_t a = s > p ? s : p, b = end < pe ? end : pe;
    if (e[0] >= 0) {
      if (!qcow_pread_full(&job->base, (int)e[0], job->buf + a, b - a, (int64_t)e[1] + (int64_t)(a - s))) return 0;
      continue;
    }
    if (!sparse) {
      memset(job->buf + a, 0, b - a);
      continue;
    }
    size_t u = job->unit;
    size_t fs = (s + u - 1) / u * u, fe = end == job->length ? end : end / u * u;
    if (fs >= fe) {
      memset(job->buf + a, 0, b - a);
      continue;
    }
    if (a < fs) memset(job->buf + a, 0, (fs < b ? fs : b) - a);
    if (b > fe) {
      size_t z = fe > a ? fe : a;
      memset(job->buf + z, 0, b - z);
    }
  }
  return 1;
}

static void loop_run(loop_job *job) {
  size_t u = job->unit, len = job->length;
  int sparse = !(job->flags & 2), zero_target = job->flags & 1;
  size_t piece = u >= PIECE ? u : PIECE - PIECE % u;
  /* The extent holding the block in hand and its end (a cursor: blocks come in order). */
  size_t ei = 0, ee = job->count ? (size_t)job->ext[2] : 0;
  for (size_t p = 0; p < len; p += piece) {
    size_t pe = p + piece < len ? p + piece : len;
    if (!fill_piece(job, p, pe, sparse)) return;
    if (!sparse) {
      if (!write_at(job, p, pe)) return;
      record(job, 1, p, pe);
      continue;
    }
    size_t run = (size_t)-1; /* start of the data run in this piece */
    for (size_t b = p; b < pe;) {
      while (ee <= b && ei + 1 < job->count) {
        ei++;
        ee += (size_t)job->ext[3 * ei + 2];
      }
      /* Blocks starting in this extent: those of a data extent are scanned (a word of each, most
       * of the time) in a loop of their own; those of a zero extent are zeros without a look when
       * they end inside it. */
      int zero_ext = ei < job->count && job->ext[3 * ei] < 0;
      size_t lim = ee < pe && ee > b ? ee : pe;
      for (; b < lim; b += u) {
        size_t be = b + u < pe ? b + u : pe;
        uint64_t head = 0;
        if (!zero_ext && be - b >= 8) memcpy(&head, job->buf + b, 8);
        if (head || (!(zero_ext && be <= ee) && !qcow_all_zero(job->buf + b, be - b))) {
          if (run == (size_t)-1) run = b;
          continue;
        }
        if (run != (size_t)-1) {
          if (!write_at(job, run, b)) return;
          record(job, 1, run, b);
          run = (size_t)-1;
        }
        if (!zero_target) record(job, 0, b, be);
      }
    }
    if (run != (size_t)-1) {
      if (!write_at(job, run, pe)) return;
      record(job, 1, run, pe);
    }
  }
}

static void loop_execute(napi_env env, void *data) {
  (void)env;
  loop_job *job = data;
  loop_run(job);
  /* The Promise's value when nothing failed: the records in `runs`. */
  job->base.result = (double)job->nruns;
}

napi_value qcow_copy_extents(napi_env env, napi_callback_info info) {
  static const char usage[] = "copyExtents(buf: Uint8Array, extents: Float64Array, count, dstFd, dstOffset, length, unit, flags, runs: Float64Array)";
  napi_value argv[9];
  size_t argc = 9;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double a[6];
  size_t buf_len = 0, ext_len = 0, runs_len = 0;
  void *buf = argc == 9 ? qcow_typed(env, argv[0], napi_uint8_array, &buf_len) : NULL;
  void *ext = buf ? qcow_typed(env, argv[1], napi_float64_array, &ext_len) : NULL;
  void *runs = ext ? qcow_typed(env, argv[8], napi_float64_array, &runs_len) : NULL;
  int ok = runs != NULL;
  for (int i = 0; ok && i < 6; i++) ok = napi_get_value_double(env, argv[2 + i], &a[i]) == napi_ok;
  if (!ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", usage);
    return NULL;
  }
  double count = a[0], length = a[3], unit = a[4];
  if (!(count >= 0 && 3 * count <= (double)ext_len && length >= 0 && length <= (double)buf_len && unit >= 1 && a[2] >= 0 && a[1] >= 0) ||
      3 * (length / unit + 2) > (double)runs_len) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", usage);
    return NULL;
  }
  /* The extents must cover the item exactly, with sane offsets. */
  const double *e = ext;
  double sum = 0;
  for (size_t i = 0; i < (size_t)count; i++) {
    if (!(e[3 * i + 2] >= 0) || (e[3 * i] >= 0 && !(e[3 * i + 1] >= 0))) sum = -1;
    if (sum >= 0) sum += e[3 * i + 2];
  }
  if (sum != length) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "copyExtents: the extents must cover the item's length");
    return NULL;
  }
  loop_job *job = qcow_pool_job_alloc(env, sizeof *job);
  if (!job) return NULL;
  job->buf = buf;
  job->ext = ext;
  job->count = (size_t)count;
  job->dst = (int)a[1];
  job->dst_off = (int64_t)a[2];
  job->length = (size_t)length;
  job->unit = (size_t)unit;
  job->flags = (int)a[5];
  job->runs = runs;
  job->max_runs = runs_len / 3;
  const napi_value keep[3] = {argv[0], argv[1], argv[8]};
  return qcow_pool_queue(env, &job->base, "copyExtents", keep, 3, loop_execute);
}
