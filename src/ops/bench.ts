/**
 * `qemu-img bench`: a fixed I/O workload against one image, timed. The same workload as qemu-img:
 * `count` requests of `bufferSize` bytes, at most `depth` in flight, the first at `offset` and each
 * next one `step` bytes further (wrapping around the image size); writes fill with `pattern`; with
 * `flushInterval`, a flush after every that many requests (waiting for the ones in flight first
 * unless `drainOnFlush` is off). A failed request ends the run with its error.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError, throwIfAborted } from '../core/errors.js';

export interface BenchOptions {
  count?: number;
  depth?: number;
  bufferSize?: number;
  /** Distance between request offsets; 0 or absent: the buffer size. */
  step?: number;
  offset?: number;
  write?: boolean;
  pattern?: number;
  flushInterval?: number;
  drainOnFlush?: boolean;
  signal?: AbortSignal;
  /** Clock in milliseconds (tests and browsers may pass their own). */
  now?: () => number;
}

export interface BenchPlan {
  count: number;
  depth: number;
  bufferSize: number;
  step: number;
  offset: number;
  write: boolean;
  pattern: number;
  flushInterval: number;
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

export const benchFooter = (seconds: number): string => `Run completed in ${seconds.toFixed(3)} seconds.`;

/** Run the workload; resolves with the elapsed time in seconds. */
export async function bench(dev: BlockDevice, plan: BenchPlan, options: { signal?: AbortSignal; now?: () => number } = {}): Promise<number> {
  const now = options.now ?? (() => performance.now());
  const buffers = Array.from({ length: Math.min(plan.depth, Math.max(plan.count, 1)) }, () => new Uint8Array(plan.bufferSize).fill(plan.write ? plan.pattern : 0));
  const free = buffers.slice();
  const size = dev.size;
  let offset = plan.offset;
  let submitted = 0;
  let failure: unknown;
  const inFlight = new Set<Promise<void>>();

  const start = now();
  while (submitted < plan.count && failure === undefined) {
    throwIfAborted(options.signal);
    if (inFlight.size >= plan.depth || free.length === 0) {
      await Promise.race(inFlight);
      continue;
    }
    const buf = free.pop()!;
    const at = offset;
    offset = size > 0 ? (offset + plan.step) % size : 0;
    const req: Promise<void> = (plan.write ? dev.write(at, buf) : dev.read(at, buf))
      .catch((e: unknown) => {
        failure ??= e;
      })
      .finally(() => {
        inFlight.delete(req);
        free.push(buf);
      });
    inFlight.add(req);
    submitted++;
    if (plan.flushInterval && submitted % plan.flushInterval === 0) {
      if (plan.drainOnFlush) await Promise.all(inFlight);
      const f: Promise<void> = dev
        .flush()
        .catch((e: unknown) => {
          failure ??= e;
        })
        .finally(() => inFlight.delete(f));
      inFlight.add(f);
      if (plan.drainOnFlush) await f;
    }
  }
  await Promise.all(inFlight);
  if (failure !== undefined) throw failure;
  return (now() - start) / 1000;
}
