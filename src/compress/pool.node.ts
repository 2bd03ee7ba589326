/**
 * A small pool of worker threads for the costly cluster codec jobs (deflating a cluster, inflating
 * one that is not tiny), so several clusters are worked on at once and the main thread keeps the
 * I/O moving. QEMU does the same with its 4-thread pool; we take min(4, cores) workers.
 *
 * Why not zlib's async API: it builds a stream and a fresh zlib state per call, and its libuv
 * thread pool is the one file reads and writes wait on too. Measured per 64 KiB cluster on this
 * project's machine: async inflate ~230 µs of overhead, a worker round trip ~40 µs, batched less.
 *
 * - Workers start only once the work has shown it will pay for them. A worker costs about what a
 *   whole Node process costs to start (85-120 ms of CPU on our 2-core VM, measured from
 *   `new Worker` to its first message), so a short job (a 3 MiB compressed image) is cheaper done
 *   entirely on the calling thread. Jobs run here, timed, until they have taken as long as
 *   starting the workers costs, WORKER_START_MS for each of them (the rent-or-buy rule: by then
 *   the job has spent on itself what the workers cost); then all workers start at once. Until one
 *   has said it is ready, and if workers cannot start at all, jobs keep running here: nothing
 *   waits on a boot. (The budget was 60 ms for the whole pool, less than one worker's start: a
 *   3 MiB image converted with -c then started two workers for the last few clusters, ~200 ms
 *   of CPU more than doing them here.)
 * - Jobs queue in order; an idle worker takes a batch (the queue shared among the idle workers,
 *   at most BATCH_MAX), each worker holds at most two batches so it never waits for the main
 *   thread between them.
 * - Inputs are copied into their own buffers and transferred (a caller's view may be a slice of a
 *   large buffer it reuses); results come back transferred, no copy.
 * - A worker keeps the process alive only while it has jobs (ref/unref).
 *
 * QCOW_CODEC_THREADS=n overrides the size; 0 runs every job on the calling thread.
 */
import { availableParallelism } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { QcowError, type QcowErrorCode } from '../core/errors.js';
import { copyInto } from './into.js';
import { runNow, type CodecOp, zstdReadyHere } from './kernels.node.js';

/** Most jobs handed to one worker in one message: amortises the message cost, keeps others fed. */
const BATCH_MAX = 16;
/** Batches a worker may hold at once. */
const BATCHES_PER_WORKER = 2;
/** What starting one worker costs, in ms of CPU (see above). */
const WORKER_START_MS = 100;
/**
 * Codec time spent on the calling thread before the workers start (see above), in ms;
 * QCOW_CODEC_START_MS overrides it (0: start on the first job). Default: WORKER_START_MS for
 * each worker of the pool.
 */
const envStart = Number(process.env.QCOW_CODEC_START_MS);
const START_AFTER_MS = process.env.QCOW_CODEC_START_MS !== undefined && Number.isFinite(envStart) && envStart >= 0 ? envStart : undefined;

export interface JobMessage {
  id: number;
  op: CodecOp;
  data: Uint8Array;
  outSize: number;
}
export type ResultMessage = { id: number; data: Uint8Array } | { id: number; error: { code: string; message: string } };

interface Job extends JobMessage {
  resolve: (out: Uint8Array) => void;
  reject: (e: unknown) => void;
}

interface Slot {
  worker: Worker;
  ready: boolean;
  /** Batches sent and not yet answered. */
  batches: number;
  /** Jobs sent and not yet answered, by id. */
  pending: Map<number, Job>;
}

export class CodecPool {
  private readonly size: number;
  private slots: Slot[] = [];
  private queue: Job[] = [];
  private nextId = 1;
  private broken = false;
  private waiters: (() => void)[] = [];

  /** Codec time spent on this thread so far, in ms (until the workers start). */
  private hereMs = 0;
  private readonly startAfterMs: number;

  constructor(size: number, startAfterMs = START_AFTER_MS ?? WORKER_START_MS * size) {
    this.size = size;
    this.startAfterMs = startAfterMs;
  }

  /** Run `op` on `data`; on a worker when one is ready, else here and now. */
  async run(op: CodecOp, data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
    if (this.size <= 0 || this.broken) return this.runHere(op, data, outSize, into);
    if (this.slots.length === 0) {
      if (this.hereMs < this.startAfterMs) return this.runTimed(op, data, outSize, into);
      this.start();
    }
    if (!this.slots.some((s) => s.ready)) return this.runHere(op, data, outSize, into);
    // A worker's result arrives in a buffer of its own: copied to `into` when the caller gave one.
    if (into) return copyInto(into, await this.runOnWorker(op, data, outSize));
    return this.runOnWorker(op, data, outSize);
  }

  private runOnWorker(op: CodecOp, data: Uint8Array, outSize: number): Promise<Uint8Array> {
    return new Promise<Uint8Array>((resolve, reject) => {
      // new Uint8Array(view) copies (Buffer#slice would not): the copy is ours to transfer.
      this.queue.push({ id: this.nextId++, op, data: new Uint8Array(data), outSize, resolve, reject });
      this.dispatch();
    });
  }

  /** Start the workers now and resolve once one is ready (or the pool cannot have any). */
  warm(): Promise<void> {
    if (this.size <= 0 || this.broken) return Promise.resolve();
    if (this.slots.length === 0) this.start();
    if (this.slots.some((s) => s.ready)) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Workers running (ready or starting). */
  get workers(): number {
    return this.slots.length;
  }

  /** Run here, counting the time against the workers' start (see START_AFTER_MS). */
  private async runTimed(op: CodecOp, data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
    if (op === 'zstd-compress' || op === 'zstd-decompress') await zstdReadyHere();
    const t0 = performance.now();
    try {
      return runNow(op, data, outSize, into);
    } finally {
      this.hereMs += performance.now() - t0;
    }
  }

  private async runHere(op: CodecOp, data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
    if (op === 'zstd-compress' || op === 'zstd-decompress') await zstdReadyHere();
    return runNow(op, data, outSize, into);
  }

  private start(): void {
    let Ctor: typeof Worker;
    try {
      // Loaded here, not at start-up: most processes never start a worker.
      Ctor = (createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads')).Worker;
    } catch {
      this.broken = true;
      for (const w of this.waiters.splice(0)) w();
      return;
    }
    for (let i = 0; i < this.size; i++) {
      let worker: Worker;
      try {
        worker = new Ctor(new URL('./worker.node.js', import.meta.url));
      } catch {
        this.broken = true;
        for (const w of this.waiters.splice(0)) w();
        return;
      }
      const slot: Slot = { worker, ready: false, batches: 0, pending: new Map() };
      worker.unref();
      worker.on('message', (m: 'ready' | ResultMessage[]) => {
        if (m === 'ready') {
          slot.ready = true;
          // Again: an unref() before the thread is up does not hold on Node 20.
          worker.unref();
          for (const w of this.waiters.splice(0)) w();
          this.dispatch();
          return;
        }
        slot.batches--;
        for (const r of m) {
          const job = slot.pending.get(r.id)!;
          slot.pending.delete(r.id);
          if ('data' in r) job.resolve(r.data);
          else job.reject(new QcowError(r.error.code as QcowErrorCode, r.error.message));
        }
        if (slot.pending.size === 0) worker.unref();
        this.dispatch();
      });
      worker.on('error', (e) => this.fail(slot, e));
      worker.on('exit', () => this.fail(slot, new Error('codec worker exited')));
      this.slots.push(slot);
    }
  }

  /** A worker died: its jobs and the queue run here; no more workers are used. */
  private fail(slot: Slot, _e: unknown): void {
    this.slots = this.slots.filter((s) => s !== slot);
    if (this.slots.length === 0) {
      this.broken = true;
      for (const w of this.waiters.splice(0)) w();
    }
    const orphans = [...slot.pending.values(), ...(this.broken ? this.queue.splice(0) : [])];
    slot.pending.clear();
    for (const job of orphans) this.runHere(job.op, job.data, job.outSize).then(job.resolve, job.reject);
    this.dispatch();
  }

  private dispatch(): void {
    while (this.queue.length > 0) {
      const free = this.slots.filter((s) => s.ready && s.batches < BATCHES_PER_WORKER);
      if (free.length === 0) return;
      // The least loaded worker first; share the queue among the free ones.
      free.sort((a, b) => a.pending.size - b.pending.size);
      const slot = free[0]!;
      const n = Math.min(BATCH_MAX, Math.ceil(this.queue.length / free.length));
      const jobs = this.queue.splice(0, n);
      const msg: JobMessage[] = jobs.map((j) => ({ id: j.id, op: j.op, data: j.data, outSize: j.outSize }));
      for (const j of jobs) slot.pending.set(j.id, j);
      slot.batches++;
      slot.worker.ref();
      slot.worker.postMessage(msg, msg.map((m) => m.data.buffer as ArrayBuffer));
    }
  }
}

const envThreads = Number(process.env.QCOW_CODEC_THREADS);
/** The process-wide pool. */
export const codecPool = new CodecPool(Number.isInteger(envThreads) && envThreads >= 0 ? envThreads : Math.min(4, availableParallelism()));
