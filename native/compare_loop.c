/*
 * The compare loop of `qemu-img compare` for one item, on libuv's thread pool (src/ops/
 * native-compare.ts drives it; ops/compare.ts's TypeScript loop does the same job where this is
 * not loaded, or where a side's bytes are not plain bytes of local files, and the two must find
 * the same first difference).
 *
 *   compareExtents(bufA, bufB, extA, countA, extB, countB, length, piece)
 *     Compare `length` guest bytes of two images. `extA` and `extB` (Float64Arrays) hold `countA`
 *     and `countB` triples [fd, offset, bytes] covering the item in order, each side's own; fd -1
 *     is a range that side reported as zeros (never read). The item is worked through in pieces of
 *     `piece` bytes: each side's piece is read into its buffer (`bufA`, `bufB`: Uint8Arrays of at
 *     least `piece` bytes; the call allocates nothing) and the two are compared while they are
 *     still in the core's cache. A Promise of the offset in the item of the first byte that
 *     differs, or -1 when none does; no byte crosses into JavaScript.
 *     Reads past a file's end read zeros. A failure rejects with an Error carrying `code` (the
 *     errno name), `syscall` ("pread") and `fd`, the descriptor that failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>
#include "pool_job.h"

typedef struct {
  const double *ext;
  size_t count;
  unsigned char *buf;
  /* A cursor over the extents: pieces come in order. */
  size_t i, start;
} side;

typedef struct {
  qcow_pool_job base;
  side s[2];
  size_t length, piece;
} cmp_job;

/* Fill the side's buffer with its bytes [p, pe) of the item. */
static int fill(cmp_job *job, side *s, size_t p, size_t pe) {
  while (s->i < s->count && s->start + (size_t)s->ext[3 * s->i + 2] <= p) s->start += (size_t)s->ext[3 * s->i++ + 2];
  size_t at = s->start;
  for (size_t i = s->i; i < s->count && at < pe; i++) {
    const double *e = s->ext + 3 * i;
    size_t end = at + (size_t)e[2];
    size_t a = at > p ? at : p, b = end < pe ? end : pe;
    if (e[0] >= 0) {
      if (!qcow_pread_full(&job->base, (int)e[0], s->buf + (a - p), b - a, (int64_t)e[1] + (int64_t)(a - at))) return 0;
    } else {
      memset(s->buf + (a - p), 0, b - a);
    }
    at = end;
  }
  return 1;
}

/* The first index where the n bytes at x and y differ (n when none): memcmp answers whether they
 * do, fast; the place is then looked for in the 4 KiB block where memcmp says so. */
static size_t first_difference(const unsigned char *x, const unsigned char *y, size_t n) {
  if (memcmp(x, y, n) == 0) return n;
  size_t at = 0;
  while (at + 4096 < n && memcmp(x + at, y + at, 4096) == 0) at += 4096;
  while (x[at] == y[at]) at++;
  return at;
}

static void cmp_execute(napi_env env, void *data) {
  (void)env;
  cmp_job *job = data;
  job->base.result = -1;
  for (size_t p = 0; p < job->length; p += job->piece) {
    size_t pe = p + job->piece < job->length ? p + job->piece : job->length;
    if (!fill(job, &job->s[0], p, pe) || !fill(job, &job->s[1], p, pe)) return;
    size_t d = first_difference(job->s[0].buf, job->s[1].buf, pe - p);
    if (d < pe - p) {
      job->base.result = (double)(p + d);
      return;
    }
  }
}

/* Whether `count` triples of `ext` cover exactly `length` bytes, with sane offsets. */
static int covers(const double *ext, double count, size_t ext_len, double length) {
  if (!(count >= 0 && 3 * count <= (double)ext_len)) return 0;
  double sum = 0;
  for (size_t i = 0; i < (size_t)count; i++) {
    const double *e = ext + 3 * i;
    if (!(e[2] >= 0) || (e[0] >= 0 && !(e[1] >= 0))) return 0;
    sum += e[2];
  }
  return sum == length;
}

napi_value qcow_compare_extents(napi_env env, napi_callback_info info) {
  static const char usage[] = "compareExtents(bufA: Uint8Array, bufB: Uint8Array, extA: Float64Array, countA, extB: Float64Array, countB, length, piece)";
  napi_value argv[8];
  size_t argc = 8;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  size_t len_a = 0, len_b = 0, ext_a_len = 0, ext_b_len = 0;
  void *buf_a = argc == 8 ? qcow_typed(env, argv[0], napi_uint8_array, &len_a) : NULL;
  void *buf_b = buf_a ? qcow_typed(env, argv[1], napi_uint8_array, &len_b) : NULL;
  void *ext_a = buf_b ? qcow_typed(env, argv[2], napi_float64_array, &ext_a_len) : NULL;
  void *ext_b = ext_a ? qcow_typed(env, argv[4], napi_float64_array, &ext_b_len) : NULL;
  double count_a, count_b, length, piece;
  int ok = ext_b != NULL && napi_get_value_double(env, argv[3], &count_a) == napi_ok && napi_get_value_double(env, argv[5], &count_b) == napi_ok &&
           napi_get_value_double(env, argv[6], &length) == napi_ok && napi_get_value_double(env, argv[7], &piece) == napi_ok;
  if (!ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", usage);
    return NULL;
  }
  if (!(length >= 0 && length <= 9007199254740991.0 && piece >= 1 && piece <= (double)len_a && piece <= (double)len_b)) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", usage);
    return NULL;
  }
  if (!covers(ext_a, count_a, ext_a_len, length) || !covers(ext_b, count_b, ext_b_len, length)) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "compareExtents: each side's extents must cover the item's length");
    return NULL;
  }
  cmp_job *job = qcow_pool_job_alloc(env, sizeof *job);
  if (!job) return NULL;
  job->s[0] = (side){ext_a, (size_t)count_a, buf_a, 0, 0};
  job->s[1] = (side){ext_b, (size_t)count_b, buf_b, 0, 0};
  job->length = (size_t)length;
  job->piece = (size_t)piece;
  const napi_value keep[4] = {argv[0], argv[1], argv[2], argv[4]};
  return qcow_pool_queue(env, &job->base, "compareExtents", keep, 4, cmp_execute);
}
