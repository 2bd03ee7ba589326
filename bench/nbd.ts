/**
 * NBD throughput: our server (`qcow serve`, its own process) against qemu-nbd on copies of the
 * same image, measured with nbdcopy reading the whole export (to null:) and writing a whole raw
 * file into it. Both servers listen on Unix sockets in a temporary folder and are stopped after.
 *
 *   import { benchNbd } from './nbd.js';   // from bench/run.ts, beside it (built to dist-bench/)
 *   const r = await benchNbd({ format: 'qcow2', sizeMiB: 256 });
 *   // r.read.ours.mibPerSec, r.read.qemu.mibPerSec, r.read.ratio (ours / qemu), same for r.write
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFile, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';

export interface NbdBenchOptions {
  /** Image to serve; made (random data, then converted to `format` by qemu-img) when absent. */
  image?: string;
  /** Its format; default qcow2 for made images. */
  format?: string;
  /** Size of the made image. Default 128. */
  sizeMiB?: number;
  /** Timed runs per case; the best is kept. Default 3. */
  runs?: number;
  /** Also time writes (each server gets its own copy of the image). Default true. */
  write?: boolean;
}

export interface Timing {
  seconds: number;
  mibPerSec: number;
}

export interface NbdBenchCase {
  ours: Timing;
  qemu: Timing;
  /** ours.mibPerSec / qemu.mibPerSec: above 1 we are faster. */
  ratio: number;
}

export interface NbdBenchResult {
  format: string;
  sizeBytes: number;
  read: NbdBenchCase;
  write?: NbdBenchCase;
}

/** The `qcow` command as npm installs it. */
const CLI = fileURLToPath(new URL('../bin/qcow', import.meta.url));

export async function benchNbd(options: NbdBenchOptions = {}): Promise<NbdBenchResult> {
  const dir = await mkdtemp(join(tmpdir(), 'qcow-nbd-bench-'));
  const stops: (() => Promise<void>)[] = [];
  try {
    const format = options.format ?? (options.image ? 'raw' : 'qcow2');
    const source = join(dir, 'source.raw');
    const image = options.image ?? (await makeImage(dir, source, format, options.sizeMiB ?? 128));
    if (options.image) await exec('qemu-img', ['convert', '-f', format, '-O', 'raw', image, source]);
    const sizeBytes = (await stat(source)).size;
    const runs = options.runs ?? 3;

    const ours = await start(stops, dir, 'ours-ro', CLI, ['serve', '-t', '-r', '-f', format], image);
    const qemu = await start(stops, dir, 'qemu-ro', 'qemu-nbd', ['-t', '-r', '-f', format], image);
    const read = compare(sizeBytes, await best(runs, () => exec('nbdcopy', ['--', ours, 'null:'])), await best(runs, () => exec('nbdcopy', ['--', qemu, 'null:'])));

    let write: NbdBenchCase | undefined;
    if (options.write ?? true) {
      const oursCopy = join(dir, `ours.${format}`);
      const qemuCopy = join(dir, `qemu.${format}`);
      await copyFile(image, oursCopy);
      await copyFile(image, qemuCopy);
      const oursRw = await start(stops, dir, 'ours-rw', CLI, ['serve', '-t', '-f', format], oursCopy);
      const qemuRw = await start(stops, dir, 'qemu-rw', 'qemu-nbd', ['-t', '-f', format], qemuCopy);
      write = compare(sizeBytes, await best(runs, () => exec('nbdcopy', ['--', source, oursRw])), await best(runs, () => exec('nbdcopy', ['--', source, qemuRw])));
    }
    return { format, sizeBytes, read, write };
  } finally {
    for (const stop of stops) await stop();
    await rm(dir, { recursive: true, force: true });
  }
}

function compare(size: number, oursSeconds: number, qemuSeconds: number): NbdBenchCase {
  const timing = (seconds: number): Timing => ({ seconds, mibPerSec: size / 2 ** 20 / seconds });
  const ours = timing(oursSeconds);
  const qemu = timing(qemuSeconds);
  return { ours, qemu, ratio: ours.mibPerSec / qemu.mibPerSec };
}

async function best(runs: number, fn: () => Promise<void>): Promise<number> {
  let min = Infinity;
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    await fn();
    min = Math.min(min, (performance.now() - t0) / 1000);
  }
  return min;
}

async function makeImage(dir: string, source: string, format: string, sizeMiB: number): Promise<string> {
  // Half random data, half zeros: both the data path and hole handling count.
  const mib = new Uint8Array(1 << 20);
  const chunks: Uint8Array[] = [];
  let x = 0x12345678;
  for (let m = 0; m < sizeMiB; m++) {
    if (m % 2 === 0) {
      for (let i = 0; i < mib.length; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        mib[i] = x & 0xff;
      }
      chunks.push(mib.slice());
    } else chunks.push(new Uint8Array(1 << 20));
  }
  await writeFile(source, chunks);
  if (format === 'raw') return source;
  const image = join(dir, `image.${format}`);
  await exec('qemu-img', ['convert', '-f', 'raw', '-O', format, source, image]);
  return image;
}

/** Start a server on a socket in `dir`; resolves with its NBD URI once its pid file exists. */
async function start(stops: (() => Promise<void>)[], dir: string, name: string, cmd: string, args: string[], image: string): Promise<string> {
  const sock = join(dir, `${name}.sock`);
  const pidFile = join(dir, `${name}.pid`);
  const child: ChildProcess = spawn(cmd, [...args, '-k', sock, '--pid-file', pidFile, image], { stdio: ['ignore', 'ignore', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  stops.push(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
  });
  for (let i = 0; i < 400; i++) {
    if (child.exitCode !== null) throw new Error(`${cmd} exited with status ${child.exitCode}`);
    if (await stat(pidFile).catch(() => undefined)) return `nbd+unix:///?socket=${sock}`;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`${cmd} did not start listening`);
}

function exec(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d) => (err += d));
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err.trim()}`))));
  });
}
