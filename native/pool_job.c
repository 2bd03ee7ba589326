/* See pool_job.h. */
#define _GNU_SOURCE
#include "pool_job.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* qcow_host.c's: the Error for an errno, named as node:fs names them. */
napi_value qcow_errno_error(napi_env env, int err, const char *syscall);

void *qcow_typed(napi_env env, napi_value v, napi_typedarray_type want, size_t *length) {
  bool is = false;
  napi_typedarray_type type;
  void *data;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) return NULL;
  if (napi_get_typedarray_info(env, v, &type, length, &data, NULL, NULL) != napi_ok || type != want) return NULL;
  return data;
}

int qcow_pread_full(qcow_pool_job *job, int fd, unsigned char *into, size_t n, int64_t at) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, into + done, n - done, (off_t)(at + (int64_t)done));
    if (r < 0) {
      if (errno == EINTR) continue;
      job->err = errno, job->err_fd = fd, job->syscall = "pread";
      return 0;
    }
    if (r == 0) break; /* the file ends: the rest reads as zeros */
    done += (size_t)r;
  }
  if (done < n) memset(into + done, 0, n - done);
  return 1;
}

static void release(napi_env env, qcow_pool_job *job) {
  for (int i = 0; i < QCOW_POOL_JOB_REFS; i++)
    if (job->refs[i]) napi_delete_reference(env, job->refs[i]);
}

/* Reject `deferred` for a job libuv cancelled: "NAME was cancelled". */
static void reject_cancelled(napi_env env, napi_deferred deferred, const char *name) {
  char text[96];
  snprintf(text, sizeof text, "%s was cancelled", name);
  napi_value msg, value = NULL;
  if (napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg) == napi_ok) napi_create_error(env, NULL, msg, &value);
  if (value) napi_reject_deferred(env, deferred, value);
}

static void complete(napi_env env, napi_status status, void *data) {
  qcow_pool_job *job = data;
  napi_value value = NULL;
  if (status != napi_ok) {
    reject_cancelled(env, job->deferred, job->name);
  } else if (job->err) {
    value = qcow_errno_error(env, job->err, job->syscall);
    napi_value fd;
    if (value && job->err_fd >= 0 && napi_create_int32(env, job->err_fd, &fd) == napi_ok) napi_set_named_property(env, value, "fd", fd);
    if (value) napi_reject_deferred(env, job->deferred, value);
  } else if (napi_create_double(env, job->result, &value) == napi_ok) {
    napi_resolve_deferred(env, job->deferred, value);
  }
  release(env, job);
  napi_delete_async_work(env, job->work);
  free(job);
}

napi_value qcow_pool_queue(napi_env env, qcow_pool_job *job, const char *name, const napi_value *keep, int nkeep, napi_async_execute_callback execute) {
  napi_value promise, resource;
  char resource_name[80];
  snprintf(resource_name, sizeof resource_name, "qcow:%s", name);
  job->name = name;
  int queued = nkeep <= QCOW_POOL_JOB_REFS;
  for (int i = 0; i < nkeep && queued; i++) queued = napi_create_reference(env, keep[i], 1, &job->refs[i]) == napi_ok;
  if (!queued || napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, resource_name, NAPI_AUTO_LENGTH, &resource) != napi_ok ||
      napi_create_async_work(env, NULL, resource, execute, complete, job, &job->work) != napi_ok || napi_queue_async_work(env, job->work) != napi_ok) {
    release(env, job);
    free(job);
    return NULL;
  }
  return promise;
}

void *qcow_pool_job_alloc(napi_env env, size_t size) {
  void *job = calloc(1, size);
  if (!job) napi_throw_error(env, "ENOMEM", "out of memory");
  return job;
}
