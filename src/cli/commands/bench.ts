import { QcowError, parseSize, bench, benchFooter, benchHeader, benchPlan } from '../../node.js';
import { interruptSignal, openForCli, writeOut } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  count?: string;
  depth?: string;
  size?: string;
  step?: string;
  offset?: string;
  write?: boolean;
  pattern?: string;
  flushInterval?: string;
  drain: boolean;
}

function integer(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text.trim())) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid ${what} specified`);
  return Number(text);
}

function bytes(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined;
  try {
    return parseSize(text, what);
  } catch {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid ${what} specified`);
  }
}

/**
 * `qcow bench`: qemu-img bench's workload and its report lines. As in qemu-img, -q changes
 * nothing (the lines are the report) and the image is opened read-only unless -w.
 */
export async function run(file: string, flags: Flags): Promise<void> {
  const plan = benchPlan({
    count: integer(flags.count, 'request count'),
    depth: integer(flags.depth, 'queue depth'),
    bufferSize: bytes(flags.size, 'buffer size'),
    step: bytes(flags.step, 'step size'),
    offset: bytes(flags.offset, 'offset'),
    write: flags.write,
    pattern: integer(flags.pattern, 'pattern byte'),
    flushInterval: integer(flags.flushInterval, 'flush interval'),
    drainOnFlush: flags.drain,
  });
  const dev = await openForCli(file, flags, { readOnly: !plan.write });
  const interrupt = interruptSignal();
  try {
    writeOut(benchHeader(plan) + '\n');
    const seconds = await bench(dev, plan, { signal: interrupt.signal });
    writeOut(benchFooter(seconds) + '\n');
  } catch (e) {
    // qemu-img names a failed request this way.
    if (e instanceof QcowError && (e.code === 'QCOW_OUT_OF_RANGE' || e.code === 'QCOW_IO')) {
      throw new QcowError(e.code, `Failed request: ${e.code === 'QCOW_OUT_OF_RANGE' ? 'Input/output error' : e.message}`, { cause: e });
    }
    throw e;
  } finally {
    interrupt.dispose();
    await dev.close();
  }
}
