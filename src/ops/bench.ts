/**
 * `qemu-img bench`: a fixed I/O workload against one image, timed. The same workload as qemu-img:
 * `count` requests of `bufferSize` bytes, at most `depth` in flight, the first at `offset` and each
 * next one `step` bytes further (wrapping around the image size); writes fill with `pattern`; with
 * `flushInterval`, a flush after every that many requests (waiting for the ones in flight first
 * unless `drainOnFlush` is off). A failed request ends the run with its error.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';

/** The workload of {@link bench}, as `qemu-img bench`'s options give it; absent fields take its defaults. */
export interface BenchOptions {
  /** Requests in all. Default 75000. */
  count?: number;
  /** Requests in flight at most. Default 64. */
  depth?: number;
  /** Bytes per request. Default 4096. */
  bufferSize?: number;
  /** Distance between request offsets; 0 or absent: the buffer size. */
  step?: number;
  /** Guest offset of the first request. Default 0. */
  offset?: number;
  /** Writes instead of reads. */
  write?: boolean;
  /** The byte writes fill their buffers with. Default 0. */
  pattern?: number;
  /** A flush after every that many requests (writes only); 0 or absent: none. */
  flushInterval?: number;
  /** Wait for the requests in flight before each flush. Default true. */
  drainOnFlush?: boolean;
  /** Stops the run with QCOW_ABORTED. */
  signal?: AbortSignal;
  /** Clock in milliseconds (tests and browsers may pass their own). */
  now?: () => number;
}

/** A checked workload, every field filled in: the {@link BenchOptions} of the same names. */
export interface BenchPlan {
  /** Requests in all. */
  count: number;
  /** Requests in flight at most. */
  depth: number;
  /** Bytes per request. */
  bufferSize: number;
  /** Distance between request offsets. */
  step: number;
  /** Guest offset of the first request. */
  offset: number;
  /** Writes instead of reads. */
  write: boolean;
  /** The byte writes fill their buffers with. */
  pattern: number;
  /** A flush after every that many requests; 0: none. */
  flushInterval: number;
  /** Wait for the requests in flight before each flush. */
  drainOnFlush: boolean;
}

/** The workload with qemu-img's defaults filled in and its checks applied. */
export function benchPlan(o: BenchOptions): BenchPlan {
  const p: BenchPlan = {
    count: o.count ?? 75000,
    depth: o.depth ?? 64,
    bufferSize: o.bufferSize ?? 4096,
    step: o.step || (o.bufferSize ?? 4096),
    offset: o.offset ?? 0,
    write: !!o.write,
    pattern: o.pattern ?? 0,
    flushInterval: o.flushInterval ?? 0,
    drainOnFlush: o.drainOnFlush ?? true,
  };
  const check = (ok: boolean, what: string) => {
    if (!ok) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid ${what} specified`);
  };
  check(Number.isSafeInteger(p.count) && p.count >= 0 && p.count <= 0x7fffffff, 'request count');
  check(Number.isSafeInteger(p.depth) && p.depth >= 1 && p.depth <= 0x7fffffff, 'queue depth');
  check(Number.isSafeInteger(p.bufferSize) && p.bufferSize >= 0 && p.bufferSize <= 0x7fffffff, 'buffer size');
  check(Number.isSafeInteger(p.step) && p.step >= 0 && p.step <= 0x7fffffff, 'step size');
  check(Number.isSafeInteger(p.offset) && p.offset >= 0, 'offset');
  check(Number.isInteger(p.pattern) && p.pattern >= 0 && p.pattern <= 0xff, 'pattern byte');
  check(Number.isSafeInteger(p.flushInterval) && p.flushInterval >= 0, 'flush interval');
  if (p.flushInterval && !p.write) throw new QcowError('QCOW_INVALID_ARGUMENT', '--flush-interval is only available in write tests');
  if (p.flushInterval && p.flushInterval < p.depth) throw new QcowError('QCOW_INVALID_ARGUMENT', "Flush interval can't be smaller than depth");
  return p;
}

/** qemu-img's first report line. */
export function benchHeader(p: BenchPlan): string {
  const lines = [
    `Sending ${p.count} ${p.write ? 'write' : 'read'} requests, ${p.bufferSize} bytes each, ${p.depth} in parallel (starting at offset ${p.offset}, step size ${p.step})`,
  ];
  if (p.flushInterval) lines.push(`Sending flush every ${p.flushInterval} requests`);
  return lines.join('\n');
}

/** qemu-img's last report line, for a run of `seconds`. */
export const benchFooter = (seconds: number): string => `Run completed in ${seconds.toFixed(3)} seconds.`;

/**
 * Run the workload; resolves with the elapsed time in seconds. Completions drive the loop: each
 * finished request frees its buffer and starts the next one, so the cost per request stays
 * constant whatever the depth (racing all in-flight promises each time would be O(depth)).
 */
export async function bench(dev: BlockDevice, plan: BenchPlan, options: { signal?: AbortSignal; now?: () => number } = {}): Promise<number> {
  const now = options.now ?? (() => performance.now());
  // One slot per request in flight: its buffer and its completion handlers, made once, so a
  // request allocates nothing of ours (two closures per request were most of the loop's garbage).
  interface Slot {
    buf: Uint8Array;
    done(): void;
    failed(e: unknown): void;
  }
  const free: Slot[] = [];
  const size = dev.size;
  let offset = plan.offset;
  let submitted = 0;
  let inFlight = 0;
  let flushing = false;
  let failure: unknown;
  const fail = (e: unknown): void => {
    failure ??= e;
  };
  /** A request (or a flush: no slot) is over; set once the run starts. */
  let finished: (slot: Slot | undefined) => void = () => undefined;
  for (let i = 0; i < Math.min(plan.depth, Math.max(plan.count, 1)); i++) {
    const slot: Slot = {
      buf: new Uint8Array(plan.bufferSize).fill(plan.write ? plan.pattern : 0),
      done: () => finished(slot),
      failed: (e: unknown) => {
        fail(e);
        finished(slot);
      },
    };
    free.push(slot);
  }

  const start = now();
  await new Promise<void>((resolve) => {
    finished = (slot) => {
      inFlight--;
      if (slot) free.push(slot);
      pump();
    };
    const startFlush = (): void => {
      inFlight++;
      dev.flush().then(
        () => {
          flushing = false;
          finished(undefined);
        },
        (e: unknown) => {
          fail(e);
          flushing = false;
          finished(undefined);
        },
      );
    };
    const pump = (): void => {
      if (failure === undefined && options.signal?.aborted) fail(new QcowError('QCOW_ABORTED', 'operation aborted', { cause: options.signal.reason }));
      // A draining flush waits for every request before it, and holds back the ones after it.
      if (flushing && plan.drainOnFlush) {
        if (inFlight === 0 && failure === undefined) startFlush();
        else if (inFlight === 0) flushing = false;
        if (flushing || inFlight > 0) return;
      }
      while (failure === undefined && !flushing && submitted < plan.count && inFlight < plan.depth && free.length > 0) {
        const slot = free.pop()!;
        const at = offset;
        offset = size > 0 ? (offset + plan.step) % size : 0;
        inFlight++;
        submitted++;
        (plan.write ? dev.write(at, slot.buf) : dev.read(at, slot.buf)).then(slot.done, slot.failed);
        if (plan.flushInterval && submitted % plan.flushInterval === 0) {
          flushing = true;
          if (!plan.drainOnFlush) {
            flushing = false;
            startFlush();
          } else if (inFlight === 0) startFlush();
        }
      }
      if (inFlight === 0 && !flushing) resolve();
    };
    pump();
  });
  if (failure !== undefined) throw failure;
  return (now() - start) / 1000;
}
