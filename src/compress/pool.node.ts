/**
 * A small pool of worker threads for the costly cluster codec jobs (deflating a cluster, inflating
 * one that is not tiny), so several clusters can be worked on at once while the main thread keeps
 * the I/O moving. QEMU does the same with its 4-thread pool; we take at most min(4, cores).
 *
 * Why not zlib's async API: it builds a stream and a fresh zlib state per call, and its libuv
 * thread pool is the one file reads and writes wait on too.
 *
 * Workers never lower the CPU a job takes: they only buy wall time, with CPU. A worker costs about
 * what a Node process costs to start, and every job handed to one costs both threads a copy and a
 * message. So the pool starts workers only when the model below says the wall time they save
 * exceeds the CPU time they add, and never more workers than there are idle cores:
 *
 * - Cost of a job done here (INLINE_NS_PER_BYTE, per byte of the cluster), of a worker's start
 *   (WORKER_START_*) and of a hand-off (HANDOFF_NS): measured, see the constants.
 * - The work still ahead: what the caller said with expect() (convert knows how many compressed
 *   clusters it will read or write), else as much as has been done so far (the rent-or-buy rule:
 *   by the time the work done here equals the workers' price, buying them is at most twice the
 *   best choice in hindsight).
 * - With w workers the codec work ahead, T, is shared by w + 1 threads: the wall saved is
 *   T * w / (w + 1) less the workers' start-up wall time; the CPU added is w starts plus a
 *   hand-off per job. Workers start, all at once, when the first exceeds the second. With the
 *   costs measured here a hand-off costs more than half of the job it hands off, so on 2 cores
 *   (one worker) workers never pay; with 4 idle cores, 3 workers pay from ~13k deflated clusters
 *   (830 MiB of `convert -c`) ahead. Inflating (~125 us) costs less than its hand-off (~150 us):
 *   never handed off.
 * - Idle cores: the cores less the load average (os.loadavg, which counts this process's own
 *   running thread too). On a machine already busy, a worker runs only by taking a core from
 *   someone, this process's I/O included: measured at load 5 on 2 cores, a 576 MiB zlib image
 *   converted to raw in 4.7-5.9 s of wall and 3.7-4.2 s of CPU with workers, 4.8 s and 2.9 s
 *   without; a 96 MiB convert -c in 2.7-4.0 s wall and 1.8 s CPU with, 1.6 s and 0.9 s without.
 * - Until a worker has said it is ready, and if workers cannot start at all, jobs keep running
 *   here: nothing waits on a boot.
 * - Jobs queue in order; an idle worker takes a batch (the queue shared among the idle workers,
 *   at most BATCH_MAX), each worker holds at most two batches so it never waits for the main
 *   thread between them.
 * - Inputs are copied into buffers of the pool's own (a caller's view may be a slice of a large
 *   buffer it reuses) and transferred; the worker sends each input buffer back with the result
 *   for the next job, and an inflated cluster goes into a buffer allocated here (see
 *   JobMessage.into): fresh buffers made the hand-off of a 64 KiB cluster ~200 us of CPU
 *   (inflate) and ~370 us (deflate) instead of ~150 and ~225. Results come back transferred.
 * - A worker keeps the process alive only while it has jobs (ref/unref).
 *
 * QCOW_CODEC_THREADS=n overrides the size; 0 runs every job on the calling thread.
 * QCOW_CODEC_START_MS=ms replaces the model with a plain budget: all workers start once the jobs
 * done here are estimated to have taken that long (0: on the first job), whatever the load.
 */
import { availableParallelism as osParallelism, loadavg } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { QcowError, type QcowErrorCode } from '../core/errors.js';
import { copyInto } from './into.js';
import { nativeZstdHere, needsZstdWasm, runNow, type CodecOp, zstdReadyHere } from './kernels.node.js';
import { hostAddon } from '../host/native.node.js';

/** Most jobs handed to one worker in one message: amortises the message cost, keeps others fed. */
const BATCH_MAX = 16;
/** Batches a worker may hold at once. */
const BATCHES_PER_WORKER = 2;
/**
 * CPU of one worker's start, ns: from `new Worker` to its first job done (node:zlib loaded there),
 * 103-109 ms of CPU and ~2400 page faults on the project's 2-core VM (2026-12-06, 5 runs).
 */
const WORKER_START_CPU_NS = 105e6;
/** Wall time from `new Worker` to its 'ready', ns: 140-260 ms on the same VM (one at a time). */
const WORKER_START_WALL_NS = 150e6;
/**
 * CPU of handing one job to a worker and taking its result back, all threads together, ns: the
 * input copy, the messages, the promise, a result allocated in fresh pages on the worker's side
 * (deflate, zstd), and more memory live at once (the convert keeps more clusters in flight while
 * they are away: the page faults of its buffers doubled). Measured by converting /tmp/zb's 96 MiB
 * image of 1462 clusters of mixed text (~23 KiB compressed) with one worker started at once
 * against none, 3-5 alternating runs at load 5-7, CPU difference less the worker's start, per
 * job: inflate (to raw) ~150 us, deflate (`convert -c` of the raw) ~225 us; a fixed part and a
 * part per byte of the cluster (the 300-byte jobs of repetitive text cost less).
 */
const HANDOFF_NS = 40e3;
const HANDOFF_NS_PER_BYTE: Record<CodecOp, number> = {
  inflate: 1.7,
  deflate: 2.8,
  'zstd-decompress': 2.8,
  'zstd-compress': 2.8,
};
/**
 * CPU of a job done here, ns per byte of the (uncompressed) cluster, on mixed text clusters that
 * compress to ~35%, on the same VM (node:zlib 1.3, zstd 1.5 in WebAssembly at full tier): inflate
 * 100-150 us per 64 KiB, deflate (level 6) 300-380 us, zstd decode 50-90 us, zstd level 3 170-240.
 */
const INLINE_NS_PER_BYTE: Record<CodecOp, number> = {
  inflate: 1.9,
  deflate: 5.3,
  'zstd-decompress': 1.1,
  'zstd-compress': 3.2,
};
/** Re-weigh the decision after this many jobs done here (it is cheap, but not free: loadavg). */
const DECIDE_EVERY = 8;

const envStart = Number(process.env.QCOW_CODEC_START_MS);
const START_AFTER_MS = process.env.QCOW_CODEC_START_MS !== undefined && process.env.QCOW_CODEC_START_MS !== '' && Number.isFinite(envStart) && envStart >= 0 ? envStart : undefined;

/**
 * zstd decoding through the system's libzstd (kernels.node.ts), ns per byte: 0.3-0.36 of the
 * WebAssembly decoder's CPU on the same clusters (64 clusters of 64 KiB decoded 50 times each, both
 * at full tier: text 0.54 against 1.79 ns/B, binary 1.01 against 2.80), so about 0.4 on the scale
 * of INLINE_NS_PER_BYTE. Cheaper work here leaves less for workers to save.
 */
const NATIVE_ZSTD_DECODE_NS_PER_BYTE = 0.4;

/** What a job costs done here, ns (see INLINE_NS_PER_BYTE); the cluster's size is the larger side. */
export function inlineCostNs(op: CodecOp, inputBytes: number, outSize: number): number {
  const perByte = op === 'zstd-decompress' && nativeZstdHere() ? NATIVE_ZSTD_DECODE_NS_PER_BYTE : INLINE_NS_PER_BYTE[op];
  return perByte * Math.max(inputBytes, outSize);
}

/** What handing the same job to a worker adds, ns (see HANDOFF_NS). */
export function handoffCostNs(op: CodecOp, inputBytes: number, outSize: number): number {
  return HANDOFF_NS + HANDOFF_NS_PER_BYTE[op] * Math.max(inputBytes, outSize);
}

/**
 * How many workers (0..max) pay for themselves for `aheadNs` of codec work here that would cost
 * `handoffNs` more to hand off, on a machine with `idleCores` cores to spare (see the rules above).
 */
export function workersWorthStarting(aheadNs: number, handoffNs: number, max: number, idleCores: number): number {
  let best = 0;
  let bestGain = 0;
  for (let w = 1; w <= Math.min(max, Math.floor(idleCores)); w++) {
    const wallSaved = (aheadNs * w) / (w + 1) - WORKER_START_WALL_NS;
    const cpuAdded = w * WORKER_START_CPU_NS + handoffNs;
    const gain = wallSaved - cpuAdded;
    if (gain > bestGain) {
      best = w;
      bestGain = gain;
    }
  }
  return best;
}

/**
 * The CPUs this process may run on. The host addon (loaded already: file stores use it) counts
 * them as node:os does; node:os itself, loaded for this alone, cost ~0.5 ms of a small convert.
 */
function availableParallelism(): number {
  return hostAddon()?.availableParallelism?.() ?? osParallelism();
}

/** Cores nobody is using right now: the cores less the 1-minute load (this thread is in it). */
function idleCores(): number {
  const cores = availableParallelism();
  const load = loadavg()[0] ?? 0;
  // loadavg is 0 where the system has none (Windows): then only this thread is counted.
  return Math.max(0, cores - Math.max(1, load));
}

export interface JobMessage {
  id: number;
  op: CodecOp;
  /** A view at the start of a buffer of the pool's own, transferred; sent back with the result. */
  data: Uint8Array;
  outSize: number;
  /**
   * Where an inflated cluster goes, allocated on the main thread and transferred with the job:
   * its pages are already mapped there, where a worker's own fresh 64 KiB result cost ~100 us of
   * page faults per cluster (its allocator hands out new pages while the main thread frees).
   */
  into?: Uint8Array;
}
export type ResultMessage = ({ id: number; data: Uint8Array } | { id: number; error: { code: string; message: string } }) & {
  /** The job's input buffer, handed back for the next job. */
  input?: ArrayBuffer;
};

interface Job extends JobMessage {
  /** The caller's input: the copy in `data` is transferred away, this one is redone here if a worker dies. */
  source: Uint8Array;
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

/** The size class of an input buffer: a power of two, at least 4 KiB. */
const sizeClass = (n: number): number => Math.max(4096, 2 ** Math.ceil(Math.log2(Math.max(1, n))));

export interface CodecPoolOptions {
  /**
   * Replace the cost model with a plain budget: start every worker once the jobs done here are
   * estimated to have cost this many ms (0: on the first job; Infinity: never).
   */
  startAfterMs?: number;
  /** Cores to spare (default: the cores less the load average, read when deciding). */
  idleCores?: () => number;
}

export class CodecPool {
  private readonly size: number;
  private slots: Slot[] = [];
  private queue: Job[] = [];
  private nextId = 1;
  private broken = false;
  private waiters: (() => void)[] = [];
  private readonly spare = new Map<number, ArrayBuffer[]>();

  private readonly startAfterMs: number | undefined;
  private readonly idleCores: () => number;
  /** Estimated CPU of the jobs done here so far, ns (see INLINE_NS_PER_BYTE). */
  private doneNs = 0;
  /** What handing those jobs off would have added, ns. */
  private doneHandoffNs = 0;
  /** Work the caller said is still ahead (expect()), less what has been done since; ns and jobs. */
  private aheadNs = 0;
  private aheadHandoffNs = 0;
  private told = false;
  /** Jobs done here since the decision was last weighed. */
  private sinceDecision = 0;

  constructor(size: number, options: CodecPoolOptions | number = {}) {
    const o = typeof options === 'number' ? { startAfterMs: options } : options;
    this.size = size;
    this.startAfterMs = o.startAfterMs ?? START_AFTER_MS;
    this.idleCores = o.idleCores ?? idleCores;
  }

  /**
   * Tell the pool that `jobs` more jobs of `op`, on clusters of `clusterSize` bytes, are coming
   * (a convert knows how many compressed clusters it will read or write). Without it the pool
   * guesses that as much work is ahead as is behind. Calls add up; each job run counts it down.
   */
  expect(op: CodecOp, jobs: number, clusterSize: number): void {
    if (!(jobs > 0)) return;
    this.told = true;
    this.aheadNs += jobs * inlineCostNs(op, clusterSize, clusterSize);
    this.aheadHandoffNs += jobs * handoffCostNs(op, clusterSize, clusterSize);
    this.sinceDecision = DECIDE_EVERY;
  }

  /** A job the caller did itself (too small to hand off): it no longer counts as work ahead. */
  doneElsewhere(op: CodecOp, inputBytes: number, outSize: number): void {
    if (!this.told) return;
    this.aheadNs = Math.max(0, this.aheadNs - inlineCostNs(op, inputBytes, outSize));
    this.aheadHandoffNs = Math.max(0, this.aheadHandoffNs - handoffCostNs(op, inputBytes, outSize));
  }

  /** Run `op` on `data`; on a worker when one is ready, else here and now. */
  async run(op: CodecOp, data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
    if (this.size <= 0 || this.broken) return this.runHere(op, data, outSize, into);
    if (this.slots.length === 0) {
      const n = this.decide();
      if (n === 0) return this.runCounted(op, data, outSize, into);
      this.start(n);
    }
    if (!this.slots.some((s) => s.ready)) return this.runHere(op, data, outSize, into);
    // A worker's result arrives in a buffer of its own: copied to `into` when the caller gave one.
    if (into) return copyInto(into, await this.runOnWorker(op, data, outSize));
    return this.runOnWorker(op, data, outSize);
  }

  private runOnWorker(op: CodecOp, data: Uint8Array, outSize: number): Promise<Uint8Array> {
    return new Promise<Uint8Array>((resolve, reject) => {
      const into = op === 'inflate' ? new Uint8Array(outSize) : undefined;
      this.queue.push({ id: this.nextId++, op, data: this.copyIn(data), into, source: data, outSize, resolve, reject });
      this.dispatch();
    });
  }

  /** Start the workers now and resolve once one is ready (or the pool cannot have any). */
  warm(): Promise<void> {
    if (this.size <= 0 || this.broken) return Promise.resolve();
    if (this.slots.length === 0) this.start(this.size);
    if (this.slots.some((s) => s.ready)) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Workers running (ready or starting). */
  get workers(): number {
    return this.slots.length;
  }

  /** How many workers to start now (0: not yet). */
  private decide(): number {
    if (this.startAfterMs !== undefined) return this.doneNs >= this.startAfterMs * 1e6 ? this.size : 0;
    if (this.sinceDecision < DECIDE_EVERY) return 0;
    this.sinceDecision = 0;
    // Told: what is still ahead. Not told: as much as is behind (see above).
    const ns = this.told ? this.aheadNs : this.doneNs;
    const handoff = this.told ? this.aheadHandoffNs : this.doneHandoffNs;
    // Fewer idle cores never make more workers pay: when none would with every core idle, the
    // load (node:os, a file read) need not be asked.
    if (workersWorthStarting(ns, handoff, this.size, this.size) === 0) return 0;
    return workersWorthStarting(ns, handoff, this.size, this.idleCores());
  }

  /** Run here, counting the job against the work ahead and toward the workers' price. */
  private async runCounted(op: CodecOp, data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
    const ns = inlineCostNs(op, data.length, outSize);
    const handoff = handoffCostNs(op, data.length, outSize);
    this.doneNs += ns;
    this.doneHandoffNs += handoff;
    this.sinceDecision++;
    if (this.told) {
      this.aheadNs = Math.max(0, this.aheadNs - ns);
      this.aheadHandoffNs = Math.max(0, this.aheadHandoffNs - handoff);
    }
    return this.runHere(op, data, outSize, into);
  }

  private async runHere(op: CodecOp, data: Uint8Array, outSize: number, into?: Uint8Array): Promise<Uint8Array> {
    if (needsZstdWasm(op)) await zstdReadyHere();
    return runNow(op, data, outSize, into);
  }

  /** A copy of `data` in a buffer of the pool's own (the caller's may be a view it reuses). */
  private copyIn(data: Uint8Array): Uint8Array {
    const buf = this.spare.get(sizeClass(data.length))?.pop() ?? new ArrayBuffer(sizeClass(data.length));
    const view = new Uint8Array(buf, 0, data.length);
    view.set(data);
    return view;
  }

  /** An input buffer back from a worker, kept for the next job of its size. */
  private recycle(buf: ArrayBuffer | undefined): void {
    if (!buf || buf.byteLength !== sizeClass(buf.byteLength)) return;
    let list = this.spare.get(buf.byteLength);
    if (!list) this.spare.set(buf.byteLength, (list = []));
    // No more than the workers can hold at once: a long queue's copies are not all kept for good.
    if (list.length < this.slots.length * BATCHES_PER_WORKER * BATCH_MAX) list.push(buf);
  }

  private start(count: number): void {
    let Ctor: typeof Worker;
    try {
      // Loaded here, not at start-up: most processes never start a worker.
      Ctor = (createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads')).Worker;
    } catch {
      this.broken = true;
      for (const w of this.waiters.splice(0)) w();
      return;
    }
    for (let i = 0; i < count; i++) {
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
          this.recycle(r.input);
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
    // From the caller's bytes: a job's copy went to the dead worker (transferred, detached here).
    for (const job of orphans) this.runHere(job.op, job.source, job.outSize).then(job.resolve, job.reject);
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
      const msg: JobMessage[] = jobs.map((j) => ({ id: j.id, op: j.op, data: j.data, outSize: j.outSize, into: j.into }));
      const transfer: ArrayBuffer[] = [];
      for (const m of msg) {
        transfer.push(m.data.buffer as ArrayBuffer);
        if (m.into) transfer.push(m.into.buffer as ArrayBuffer);
      }
      for (const j of jobs) slot.pending.set(j.id, j);
      slot.batches++;
      slot.worker.ref();
      slot.worker.postMessage(msg, transfer);
    }
  }
}

const envThreads = Number(process.env.QCOW_CODEC_THREADS);
/** The process-wide pool. */
export const codecPool = new CodecPool(Number.isInteger(envThreads) && envThreads >= 0 ? envThreads : Math.min(4, availableParallelism()));
