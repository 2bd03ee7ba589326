/*
 * The addon's calls that run on libuv's thread pool (the native loops of copy_loop.c and
 * compare_loop.c; copyFileRange, spliceToPipe and writeBehind in qcow_host.c) share this: a job
 * that settles a Promise, keeps the typed arrays it works on alive until then, and reports a
 * failed system call as node:fs would (an Error with `code`, `syscall` and, when one is known,
 * the descriptor `fd`).
 */
#ifndef QCOW_POOL_JOB_H
#define QCOW_POOL_JOB_H
#include <stdint.h>
#include <stddef.h>
#include <node_api.h>

#define QCOW_POOL_JOB_REFS 4

/* The first member of each kind of job: qcow_pool_queue's completion frees the whole job. */
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref refs[QCOW_POOL_JOB_REFS];
  const char *name;
  /* What the Promise resolves with, when no call failed. */
  double result;
  /* A failed call: its errno, the descriptor (-1 when the error names none) and the call's name. */
  int err, err_fd;
  const char *syscall;
} qcow_pool_job;

/* The data of `v` when it is a typed array of type `want` (its element count into `length`). */
void *qcow_typed(napi_env env, napi_value v, napi_typedarray_type want, size_t *length);

/* pread until `n` bytes are in or the file ends (the rest is then zeros): 1, or 0 with the
 * failure noted in the job. */
int qcow_pread_full(qcow_pool_job *job, int fd, unsigned char *into, size_t n, int64_t at);

/* A job, zeroed (calloc): NULL with a thrown "out of memory" Error (code ENOMEM) when
 * there is no memory for it. */
void *qcow_pool_job_alloc(napi_env env, size_t size);

/* Queue `job` (from qcow_pool_job_alloc, zeroed but for the loop's own fields) to run `execute` on the pool,
 * holding `keep` (at most QCOW_POOL_JOB_REFS values) until it settles: the Promise, or NULL
 * (the job freed) when it could not be queued. */
napi_value qcow_pool_queue(napi_env env, qcow_pool_job *job, const char *name, const napi_value *keep, int nkeep, napi_async_execute_callback execute);

#endif
