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

/* qcow_host.c's: the Error for an errno, named as node:fs names them. */
napi_value qcow_errno_error(napi_env env, int err, const char *syscall);

typedef struct {
  const double *ext;
  size_t count;
  unsigned char *buf;
  /* A cursor over the extents: pieces come in order. */
  size_t i, start;
} side;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref refs[4];
  side s[2];
  size_t length, piece;
  double found;
  int err, err_fd;
} cmp_job;

static int read_at(cmp_job *job, int fd, unsigned char *into, size_t n, int64_t at) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, into + done, n - done, (off_t)(at + (int64_t)done));
    if (r < 0) {
      if (errno == EINTR) continue;
      job->err = errno, job->err_fd = fd;
      return 0;
    }
    if (r == 0) break; /* the file ends: the rest reads as zeros */
    done += (size_t)r;
  }
  if (done < n) memset(into + done, 0, n - done);
  return 1;
}

/* Fill the side's buffer with its bytes [p, pe) of the item. */
static int fill(cmp_job *job, side *s, size_t p, size_t pe) {
  while (s->i < s->count && s->start + (size_t)s->ext[3 * s->i + 2] <= p) s->start += (size_t)s->ext[3 * s->i++ + 2];
  size_t at = s->start;
  for (size_t i = s->i; i < s->count && at < pe; i++) {
    const double *e = s->ext + 3 * i;
    size_t end = at + (size_t)e[2];
    size_t a = at > p ? at : p, b = end < pe ? end : pe;
    if (e[0] >= 0) {
      if (!read_at(job, (int)e[0], s->buf + (a - p), b - a, (int64_t)e[1] + (int64_t)(a - at))) return 0;
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
  job->found = -1;
  for (size_t p = 0; p < job->length; p += job->piece) {
    size_t pe = p + job->piece < job->length ? p + job->piece : job->length;
    if (!fill(job, &job->s[0], p, pe) || !fill(job, &job->s[1], p, pe)) return;
    size_t d = first_difference(job->s[0].buf, job->s[1].buf, pe - p);
    if (d < pe - p) {
      job->found = (double)(p + d);
      return;
    }
  }
}

static void cmp_complete(napi_env env, napi_status status, void *data) {
  cmp_job *job = data;
  napi_value value = NULL;
  if (status != napi_ok) {
    napi_value msg;
    if (napi_create_string_utf8(env, "compareExtents was cancelled", NAPI_AUTO_LENGTH, &msg) == napi_ok) napi_create_error(env, NULL, msg, &value);
    if (value) napi_reject_deferred(env, job->deferred, value);
  } else if (job->err) {
    value = qcow_errno_error(env, job->err, "pread");
    napi_value fd;
    if (value && napi_create_int32(env, job->err_fd, &fd) == napi_ok) napi_set_named_property(env, value, "fd", fd);
    if (value) napi_reject_deferred(env, job->deferred, value);
  } else if (napi_create_double(env, job->found, &value) == napi_ok) {
    napi_resolve_deferred(env, job->deferred, value);
  }
  for (int i = 0; i < 4; i++)
    if (job->refs[i]) napi_delete_reference(env, job->refs[i]);
  napi_delete_async_work(env, job->work);
  free(job);
}

static void *typed(napi_env env, napi_value v, napi_typedarray_type want, size_t *length) {
  bool is = false;
  napi_typedarray_type type;
  void *data;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) return NULL;
  if (napi_get_typedarray_info(env, v, &type, length, &data, NULL, NULL) != napi_ok || type != want) return NULL;
  return data;
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
  void *buf_a = argc == 8 ? typed(env, argv[0], napi_uint8_array, &len_a) : NULL;
  void *buf_b = buf_a ? typed(env, argv[1], napi_uint8_array, &len_b) : NULL;
  void *ext_a = buf_b ? typed(env, argv[2], napi_float64_array, &ext_a_len) : NULL;
  void *ext_b = ext_a ? typed(env, argv[4], napi_float64_array, &ext_b_len) : NULL;
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
  cmp_job *job = calloc(1, sizeof *job);
  if (!job) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  job->s[0] = (side){ext_a, (size_t)count_a, buf_a, 0, 0};
  job->s[1] = (side){ext_b, (size_t)count_b, buf_b, 0, 0};
  job->length = (size_t)length;
  job->piece = (size_t)piece;
  napi_value promise, resource;
  const int keep[4] = {0, 1, 2, 4};
  int queued = 1;
  for (int i = 0; i < 4 && queued; i++) queued = napi_create_reference(env, argv[keep[i]], 1, &job->refs[i]) == napi_ok;
  if (!queued || napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "qcow:compareExtents", NAPI_AUTO_LENGTH, &resource) != napi_ok ||
      napi_create_async_work(env, NULL, resource, cmp_execute, cmp_complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    for (int i = 0; i < 4; i++)
      if (job->refs[i]) napi_delete_reference(env, job->refs[i]);
    free(job);
    return NULL;
  }
  return promise;
}
