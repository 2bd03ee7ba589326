/**
 * `npm run bench`: our CLI against qemu-img (and qemu-nbd) on the same images in one run.
 * Each workload runs ours and theirs alternately, several times; we print the median time, the
 * throughput, the ratio ours/theirs (lower is better) and the peak RSS of each, and write the
 * same as JSON to bench-results/latest.json. Beside wall time it takes each run's CPU time (user +
 * sys of the process and every process it waited for, from GNU time's wait4 rusage), because on
 * a 2-core VM shared with other jobs the CPU seconds are the steadier comparison.
 *
 *   npm run bench -- [--reps N] [--scale F] [--only name,name] [--dir DIR] [--keep] [--rest S] [--warm-pages MIB] [--machine-cpu]
 *
 * `--only 0-startup` runs only the start-up table (bench/startup.ts: every short command
 * beside `node -e 0`); `node dist-bench/startup.js` runs it with its own options.
 *
 * --scale shrinks the image sizes (0.25 = a quarter) for a quick look; the published figures use 1.
 *
 * --rest S pauses S seconds before each timed run (after the outputs of the round before are
 * removed): a single convert on a machine that was doing something else, rather than runs back to
 * back. On VMs with free page reporting (ours) memory freed a moment ago is still the guest's and
 * cheap to reuse, while memory free for a few seconds has gone back to the host and costs a host
 * fault per page on first touch; back-to-back runs measure the first case only.
 *
 * --warm-pages MIB writes MIB MiB to a file in /dev/shm and removes it just before each timed run
 * (after --rest), so that every run, ours and theirs, takes pages the guest touched a moment ago:
 * what a machine without free page reporting always gives. Without it, which side gets host-cold
 * pages depends on what the run before left in the page cache: qcow's write-behind leaves ~64 MiB,
 * qemu-img a whole output, whose removal frees warm pages for the next run (round eighteen's
 * section of docs/performance.md: qemu-img's 1 GiB qcow2 -> raw took 0.77 s of system time with
 * warm pages and 2.1 s with cold ones). `--rest 5` gives every side cold pages instead.
 *
 * --machine-cpu adds, for each timed run, the busy CPU seconds of the whole machine (/proc/stat,
 * every CPU) from its start to the end of a `sync` after it. A process's own CPU leaves out the
 * writeback of what it wrote when the kernel's flusher threads do it, during the run or after the
 * process ends: qemu-img leaves all of it to them, while qcow's write-behind submits much of it
 * from its own threads (docs/performance.md, round twelve). Counting the machine charges both
 * sides for all of it. Only meaningful on an otherwise idle machine: everything else running is
 * counted too.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { mkdir, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs as parseCliArgs } from 'node:util';

/** The `qcow` command as npm installs it (the shell launcher, which runs bin/qcow.cjs under node). */
const CLI = fileURLToPath(new URL('../bin/qcow', import.meta.url));
const MiB = 2 ** 20;
const GiB = 2 ** 30;

interface Args {
  reps: number;
  scale: number;
  only?: Set<string>;
  dir: string;
  keep: boolean;
  /** Seconds to pause before each timed run (see the top); 0 runs back to back. */
  rest: number;
  /** MiB written to /dev/shm and removed before each timed run, to hand it warm pages (see the top); 0: none. */
  warmPagesMiB: number;
  /** Also measure the machine's busy CPU over each run and a `sync` after it (see the top). */
  machineCpu: boolean;
}

function parseArgs(argv: string[]): Args {
  // node:util's parser: unknown options and missing values are its errors.
  const { values: o } = parseCliArgs({
    args: argv,
    options: { reps: { type: 'string' }, scale: { type: 'string' }, only: { type: 'string' }, dir: { type: 'string' }, keep: { type: 'boolean' }, rest: { type: 'string' }, 'warm-pages': { type: 'string' }, 'machine-cpu': { type: 'boolean' } },
  });
  const a: Args = { reps: Number(o.reps ?? 3), scale: Number(o.scale ?? 1), dir: o.dir ?? '', keep: o.keep ?? false, rest: Number(o.rest ?? 0), warmPagesMiB: Number(o['warm-pages'] ?? 0), machineCpu: o['machine-cpu'] ?? false };
  if (o.only !== undefined) a.only = new Set(o.only.split(','));
  if (!(a.reps >= 1) || !(a.scale > 0) || !(a.rest >= 0) || !Number.isInteger(a.warmPagesMiB) || a.warmPagesMiB < 0) {
    throw new Error('--reps must be >= 1, --scale > 0, --rest >= 0 and --warm-pages a whole number of MiB >= 0');
  }
  if (a.warmPagesMiB > 0 && !existsSync('/dev/shm')) throw new Error('--warm-pages needs /dev/shm (a tmpfs)');
  // Images are kept between runs (they take a while to make), one set per scale.
  a.dir ||= join(tmpdir(), `qcow-bench-${a.scale}`);
  return a;
}

interface Sample {
  seconds: number;
  /** User + system CPU seconds of the process tree (0 without GNU time). */
  cpu: number;
  rssKiB: number;
  /** With --machine-cpu: busy CPU seconds of every CPU over the run and a `sync` after it. */
  machineCpu?: number;
}

/** Busy time of all CPUs so far, in clock ticks (/proc/stat: all but idle and iowait). */
function machineBusyTicks(): number {
  const cpu = readFileSync('/proc/stat', 'latin1').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = cpu;
  return user + nice + system + irq + softirq + steal;
}

/** /proc/stat counts in USER_HZ ticks, 100 a second on every Linux architecture Node runs on. */
const TICKS_PER_SECOND = 100;

/** measure(), also counting the machine's busy CPU until a `sync` after the run has returned. */
async function measureWithMachine(cmd: string, args: string[], okCodes = [0]): Promise<Sample> {
  const before = machineBusyTicks();
  const sample = await measure(cmd, args, okCodes);
  spawnSync('sync');
  return { ...sample, machineCpu: (machineBusyTicks() - before) / TICKS_PER_SECOND };
}

/** Run a command, timing it and reading its peak RSS (GNU time when present, else /proc polling). */
function measure(cmd: string, args: string[], okCodes = [0]): Promise<Sample> {
  const useTime = existsSync('/usr/bin/time');
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = useTime
      ? spawn('/usr/bin/time', ['-f', '__RSS__%M __CPU__%U %S', cmd, ...args], { stdio: ['ignore', 'ignore', 'pipe'] })
      : spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('exit', (code) => {
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const m = /__RSS__(\d+) __CPU__([\d.]+) ([\d.]+)/.exec(err);
      if (code !== null && !okCodes.includes(code)) reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err.replace(/__RSS__.*\s*/, '').trim()}`));
      else resolve({ seconds, cpu: m ? Number(m[2]) + Number(m[3]) : 0, rssKiB: m ? Number(m[1]) : 0 });
    });
  });
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
};

async function sh(cmd: string, args: string[], okCodes = [0]): Promise<void> {
  await measure(cmd, args, okCodes);
}

/** Read files whole (not timed) so a timed run finds them in the page cache. */
async function warm(files: string[]): Promise<void> {
  const buf = Buffer.allocUnsafe(4 * MiB);
  for (const f of files) {
    if (!existsSync(f)) continue;
    const fh = await open(f, 'r');
    try {
      for (let off = 0; ; off += buf.length) if ((await fh.read(buf, 0, buf.length, off)).bytesRead < buf.length) break;
    } finally {
      await fh.close();
    }
  }
}

/**
 * Hand the next run warm pages (--warm-pages): fill `mib` MiB of tmpfs and free it again. Pages of
 * a tmpfs file are the file's memory, so writing them touches every one, and unlinking the file
 * frees them at once; the next run's first allocations get them back before the host can.
 */
async function warmPages(mib: number): Promise<void> {
  const path = join('/dev/shm', `qcow-bench-warm-${process.pid}`);
  const chunk = Buffer.alloc(4 * MiB, 1);
  const fh = await open(path, 'w');
  try {
    for (let off = 0; off < mib * MiB; off += chunk.length) await fh.write(chunk, 0, Math.min(chunk.length, mib * MiB - off), off);
  } finally {
    await fh.close();
    await rm(path, { force: true });
  }
}

/** Write `size` bytes: `randomPart` of them incompressible, the rest compressible text-like data. */
async function makeRaw(path: string, size: number, randomFraction: number, piece = 4 * MiB): Promise<void> {
  const fh = await open(path, 'w');
  const chunk = Buffer.alloc(piece);
  const text = Buffer.from('The quick brown fox jumps over the lazy dog; qcow bench data 0123456789.\n');
  try {
    for (let off = 0, i = 0; off < size; off += chunk.length, i++) {
      const n = Math.min(chunk.length, size - off);
      // Alternate random and compressible chunks so both kinds are spread over the image.
      if ((i * randomFraction) % 1 < randomFraction && randomFraction > 0) randomFillSync(chunk, 0, n);
      else for (let p = 0; p < n; p += text.length) text.copy(chunk, p, 0, Math.min(text.length, n - p));
      await fh.write(chunk, 0, n, off);
    }
  } finally {
    await fh.close();
  }
}

interface Workload {
  name: string;
  description: string;
  bytes: number;
  ours: { cmd: string; args: string[]; okCodes?: number[] };
  theirs: { cmd: string; args: string[]; okCodes?: number[] };
  cleanup?: string[];
}

interface Result {
  name: string;
  description: string;
  bytes: number;
  ours: { median: number; rssMiB: number; runs: number[]; cpuMedian?: number; cpuRuns?: number[]; machineCpuMedian?: number };
  theirs: { median: number; rssMiB: number; runs: number[]; cpuMedian?: number; cpuRuns?: number[]; machineCpuMedian?: number };
  ratio: number;
  /** Median over the rounds of (our CPU seconds / theirs), the two runs of a round side by side. */
  cpuRatio?: number;
  /** The same for wall time. */
  pairRatio?: number;
  /** Best run against best run: on a shared VM, noise (writeback, neighbours) only adds time. */
  bestRatio: number;
  /**
   * The same for CPU seconds. On our VMs a run's system time is bimodal for qemu-img as for us
   * (a run that gets pages the host took back pays a host fault per page: a 1 GiB convert takes
   * 0.5 or 2 s), so the lowest CPU of each side is the steadiest measure of its own cost.
   */
  bestCpuRatio?: number;
  /** With --machine-cpu: median over the rounds of (our machine CPU seconds / theirs). */
  machineCpuRatio?: number;
}

/**
 * The CLI as users run it is the bundle (see bin/qcow.cjs); after a bare `tsc` the launcher falls
 * back to the unbundled modules, ~40 ms slower to start, and every figure would be off by that.
 */
function requireFreshBundle(): void {
  const cli = fileURLToPath(new URL('../dist/cli/', import.meta.url));
  const mtime = (f: string) => (existsSync(join(cli, f)) ? statSync(join(cli, f)).mtimeMs : 0);
  // tsc -b rewrites only changed outputs; its build-info file marks every build that changed any.
  if (mtime('qcow.bundle.cjs') < Math.max(mtime('program.js'), mtime('../.tsbuildinfo'))) {
    throw new Error('the CLI bundle is missing or older than dist/: run `npm run build` (or `node scripts/build-cli.mjs`) first');
  }
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  requireFreshBundle();
  const dir = args.dir;
  await mkdir(dir, { recursive: true });
  const s = (n: number) => Math.max(MiB, Math.round((n * args.scale) / MiB) * MiB);
  const want = (name: string) => !args.only || [...args.only].some((o) => name.startsWith(o));
  const p = (f: string) => join(dir, f);
  const ours = (...a: string[]) => ({ cmd: CLI, args: a });
  const qimg = (...a: string[]) => ({ cmd: 'qemu-img', args: a });

  console.log(`# qcow bench — ${new Date().toISOString()} — reps ${args.reps}, scale ${args.scale}${args.rest > 0 ? `, ${args.rest} s rest before each run` : ''}${args.warmPagesMiB > 0 ? `, ${args.warmPagesMiB} MiB of warm pages before each run` : ''}`);
  console.log('preparing images with qemu-img ...');
  const allocSize = s(GiB);
  const mixedSize = s(512 * MiB);
  if (!existsSync(p('alloc.raw'))) await makeRaw(p('alloc.raw'), allocSize, 1);
  if (!existsSync(p('alloc.qcow2'))) await sh('qemu-img', ['convert', '-O', 'qcow2', p('alloc.raw'), p('alloc.qcow2')]);
  if (!existsSync(p('mixed.raw'))) await makeRaw(p('mixed.raw'), mixedSize, 0.5);
  if (!existsSync(p('zlib.qcow2'))) await sh('qemu-img', ['convert', '-c', '-O', 'qcow2', p('mixed.raw'), p('zlib.qcow2')]);
  if (!existsSync(p('zstd.qcow2'))) await sh('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', p('mixed.raw'), p('zstd.qcow2')]);
  if (!existsSync(p('sparse.qcow2'))) {
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('sparse.qcow2'), '4T']);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 1T 2M', '-c', 'write -P 0x33 3T 1M', '-c', 'write -P 0x44 4095G 1M', p('sparse.qcow2')]);
  }
  if (!existsSync(p('scattered.qcow2'))) {
    // 64 KiB of data at the start of every 2 MiB: most chunks of a convert are part data, part zero.
    const size = s(GiB);
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('scattered.qcow2'), String(size)]);
    const writes: string[] = [];
    for (let off = 0; off < size; off += 2 * MiB) writes.push('-c', `write -P 0x5a ${off} 64k`);
    await sh('qemu-io', ['-f', 'qcow2', ...writes, p('scattered.qcow2')]);
  }
  // Wider than either tool's L2 cache: 1 TiB with 64 KiB written at the start of every 512 MiB, so
  // each of its 2048 L2 tables holds one cluster and a request stepping 512 MiB misses every time
  // (qcow's cache covers 128 GiB, qemu's default 256 GiB).
  if (!existsSync(p('wide.qcow2'))) {
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('wide.qcow2'), '1T']);
    const writes: string[] = [];
    for (let off = 0; off < 1024 * GiB; off += 512 * MiB) writes.push('-c', `write -P 0x3c ${off} 64k`);
    await sh('qemu-io', ['-f', 'qcow2', ...writes, p('wide.qcow2')]);
  }
  if (!existsSync(p('alloc.qcow'))) await sh('qemu-img', ['convert', '-O', 'qcow', p('alloc.raw'), p('alloc.qcow')]);
  // qemu 7.2's convert -c -O qcow exits 1 after writing a correct image (docs/notes/qcow1.md §9).
  if (!existsSync(p('zlib.qcow'))) await sh('qemu-img', ['convert', '-c', '-O', 'qcow', p('mixed.raw'), p('zlib.qcow')], [0, 1]);
  if (!existsSync(p('bench.qcow2'))) await sh('qemu-img', ['convert', '-O', 'qcow2', p('alloc.raw'), p('bench.qcow2')]);
  if (!existsSync(p('tiny.qcow2'))) await sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('tiny.qcow2'), '1M']);
  // Round two (issue 21): the shapes real images have besides the plain ones above.
  // Mixed: plain clusters (incompressible data stays uncompressed), compressed and zero clusters.
  if (!existsSync(p('mix.qcow2'))) {
    await sh('qemu-img', ['convert', '-c', '-O', 'qcow2', p('mixed.raw'), p('mix.qcow2')]);
    const zeros: string[] = [];
    for (let off = 0; off + 6 * MiB <= mixedSize; off += 32 * MiB) zeros.push('-c', `write -z ${off + 2 * MiB} 4M`);
    await sh('qemu-io', ['-f', 'qcow2', ...zeros, p('mix.qcow2')]);
  }
  if (!existsSync(p('c4k.qcow2'))) await sh('qemu-img', ['convert', '-O', 'qcow2', '-o', 'cluster_size=4096', p('mixed.raw'), p('c4k.qcow2')]);
  if (!existsSync(p('c2m.qcow2'))) await sh('qemu-img', ['convert', '-O', 'qcow2', '-o', 'cluster_size=2M', p('mixed.raw'), p('c2m.qcow2')]);
  // A small compressed image: the fixed costs (start-up, codec set-up) are most of its convert.
  if (!existsSync(p('small.raw'))) await makeRaw(p('small.raw'), 3 * MiB, 0.5, 256 * 1024);
  if (!existsSync(p('small-zlib.qcow2'))) await sh('qemu-img', ['convert', '-c', '-O', 'qcow2', p('small.raw'), p('small-zlib.qcow2')]);
  if (!existsSync(p('small-zstd.qcow2'))) await sh('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', p('small.raw'), p('small-zstd.qcow2')]);
  // A chain of three: base (the mixed data), then two overlays each rewriting a part of it.
  if (!existsSync(p('chain-top.qcow2'))) {
    await sh('qemu-img', ['convert', '-O', 'qcow2', p('mixed.raw'), p('chain-base.qcow2')]);
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', p('chain-base.qcow2'), '-F', 'qcow2', p('chain-mid.qcow2')]);
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', p('chain-mid.qcow2'), '-F', 'qcow2', p('chain-top.qcow2')]);
    const layer = (pattern: number, from: number): string[] => {
      const w: string[] = [];
      for (let off = from; off + MiB <= mixedSize; off += 8 * MiB) w.push('-c', `write -P ${pattern} ${off} 1M`);
      return w;
    };
    await sh('qemu-io', ['-f', 'qcow2', ...layer(0x61, 0), p('chain-mid.qcow2')]);
    await sh('qemu-io', ['-f', 'qcow2', ...layer(0x62, 4 * MiB), p('chain-top.qcow2')]);
  }

  // Encrypted images (LUKS and legacy AES qcow2), the same mixed data: the cipher runs per cluster.
  // Made with iter-time=10 so the key derivation stays short on both sides.
  const secret = ['--object', 'secret,id=sec0,data=benchpass'];
  if (!existsSync(p('pass.txt'))) await writeFile(p('pass.txt'), 'benchpass');
  const encrypted: string[] = [];
  for (const [f, opts] of [
    ['luks.qcow2', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10'],
    ['aes.qcow2', 'encrypt.format=aes,encrypt.key-secret=sec0'],
  ] as const) {
    try {
      if (!existsSync(p(f))) await sh('qemu-img', ['convert', ...secret, '-O', 'qcow2', '-o', opts, p('mixed.raw'), p(f)]);
      encrypted.push(f);
    } catch (e) {
      // qemu-img builds without a crypto backend (or without legacy AES) cannot make them.
      console.log(`${f}: not made (${(e as Error).message.split('\n')[0]}); its workload is left out`);
    }
  }

  const out = (n: string) => p(`out-${n}`);
  const workloads: Workload[] = [
    // The fixed cost of a command, which every short workload pays (no target: information).
    { name: '0-start-up', description: 'info on a 1 MiB qcow2: process start-up and one image open', bytes: MiB, ours: ours('info', p('tiny.qcow2')), theirs: qimg('info', p('tiny.qcow2')) },
    { name: '0-raw-copy', description: 'cp of the 1 GiB raw file (the machine limit for workload 1)', bytes: allocSize, ours: { cmd: 'cp', args: [p('alloc.raw'), out('cp-a')] }, theirs: { cmd: 'cp', args: [p('alloc.raw'), out('cp-b')] } },
    { name: '1-qcow2-to-raw', description: 'convert 1 GiB allocated qcow2 (64k clusters, random) -> raw', bytes: allocSize, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('alloc.qcow2'), out('1a')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('alloc.qcow2'), out('1b')) },
    { name: '2-zlib-to-raw', description: 'convert 512 MiB zlib-compressed qcow2 (mixed) -> raw', bytes: mixedSize, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('zlib.qcow2'), out('2a')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('zlib.qcow2'), out('2b')) },
    { name: '2-zstd-to-raw', description: 'convert 512 MiB zstd-compressed qcow2 (mixed) -> raw', bytes: mixedSize, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('zstd.qcow2'), out('2c')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('zstd.qcow2'), out('2d')) },
    { name: '3-raw-to-qcow2', description: 'convert 512 MiB raw (mixed) -> qcow2', bytes: mixedSize, ours: ours('convert', '-f', 'raw', '-O', 'qcow2', p('mixed.raw'), out('3a')), theirs: qimg('convert', '-f', 'raw', '-O', 'qcow2', p('mixed.raw'), out('3b')) },
    // Copy offload (-C, copy_file_range) on both sides: the kernel copies, no bytes through either program.
    { name: '3-raw-to-qcow2-C', description: 'convert -C 512 MiB raw (mixed) -> qcow2 (copy offload)', bytes: mixedSize, ours: ours('convert', '-C', '-f', 'raw', '-O', 'qcow2', p('mixed.raw'), out('3e')), theirs: qimg('convert', '-C', '-f', 'raw', '-O', 'qcow2', p('mixed.raw'), out('3f')) },
    { name: '1-qcow2-to-raw-C', description: 'convert -C 1 GiB allocated qcow2 -> raw (copy offload)', bytes: allocSize, ours: ours('convert', '-C', '-f', 'qcow2', '-O', 'raw', p('alloc.qcow2'), out('1c')), theirs: qimg('convert', '-C', '-f', 'qcow2', '-O', 'raw', p('alloc.qcow2'), out('1d')) },
    // Streams: qemu-img cannot write into a pipe or read from one; its file convert is the yardstick.
    { name: '3-raw-to-qcow2-stream', description: 'convert 512 MiB raw (mixed) -> qcow2 into a pipe (| cat >)', bytes: mixedSize, ours: { cmd: 'sh', args: ['-c', `"${CLI}" convert -f raw -O qcow2 "${p('mixed.raw')}" - | cat > "${out('3g')}"`] }, theirs: qimg('convert', '-f', 'raw', '-O', 'qcow2', p('mixed.raw'), out('3h')) },
    { name: '1-qcow2-stream-to-raw', description: 'convert 1 GiB allocated qcow2 from a pipe (cat |) -> raw', bytes: allocSize, ours: { cmd: 'sh', args: ['-c', `cat "${p('alloc.qcow2')}" | "${CLI}" convert -O raw - "${out('1e')}"`] }, theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('alloc.qcow2'), out('1f')) },
    { name: '3-raw-to-qcow2-c', description: 'convert 512 MiB raw (mixed) -> compressed qcow2 (-c)', bytes: mixedSize, ours: ours('convert', '-c', '-f', 'raw', '-O', 'qcow2', p('mixed.raw'), out('3c')), theirs: qimg('convert', '-c', '-f', 'raw', '-O', 'qcow2', p('mixed.raw'), out('3d')) },
    { name: '4-sparse-to-raw', description: 'convert 4 TiB sparse qcow2 (5 MiB written) -> sparse raw', bytes: 5 * MiB, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('sparse.qcow2'), out('4a')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('sparse.qcow2'), out('4b')) },
    { name: '4-sparse-to-qcow2', description: 'convert 4 TiB sparse qcow2 -> qcow2', bytes: 5 * MiB, ours: ours('convert', '-f', 'qcow2', '-O', 'qcow2', p('sparse.qcow2'), out('4c')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'qcow2', p('sparse.qcow2'), out('4d')) },
    // Not in the issue's list (no target): sparse data spread over the whole disk, as in images of
    // installed systems, where most chunks hold a little data and many zeros.
    { name: '8-scattered-to-raw', description: 'convert 1 GiB qcow2 with 64 KiB written every 2 MiB -> raw', bytes: s(GiB) / 32, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('scattered.qcow2'), out('8a')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('scattered.qcow2'), out('8b')) },
    // Also without targets: the commands scripts run after a convert. compare reads both images
    // whole; check walks every table and refcount of the image.
    { name: '9-compare', description: 'compare 1 GiB allocated qcow2 with its raw (identical)', bytes: allocSize, ours: ours('compare', p('alloc.qcow2'), p('alloc.raw')), theirs: qimg('compare', p('alloc.qcow2'), p('alloc.raw')) },
    { name: '9-check', description: 'check a 1 GiB allocated qcow2 (16384 clusters)', bytes: allocSize, ours: ours('check', p('alloc.qcow2')), theirs: qimg('check', p('alloc.qcow2')) },
    { name: '6-qcow-to-raw', description: 'convert 1 GiB allocated qcow v1 -> raw', bytes: allocSize, ours: ours('convert', '-f', 'qcow', '-O', 'raw', p('alloc.qcow'), out('6a')), theirs: qimg('convert', '-f', 'qcow', '-O', 'raw', p('alloc.qcow'), out('6b')) },
    { name: '10-mixed-to-raw', description: 'convert 512 MiB qcow2 of plain, zlib and zero clusters -> raw', bytes: mixedSize, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('mix.qcow2'), out('10a')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('mix.qcow2'), out('10b')) },
    { name: '11-4k-clusters-to-raw', description: 'convert 512 MiB qcow2 with 4 KiB clusters -> raw', bytes: mixedSize, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('c4k.qcow2'), out('11a')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('c4k.qcow2'), out('11b')) },
    { name: '11-2m-clusters-to-raw', description: 'convert 512 MiB qcow2 with 2 MiB clusters -> raw', bytes: mixedSize, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('c2m.qcow2'), out('11c')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('c2m.qcow2'), out('11d')) },
    { name: '12-small-zlib-to-raw', description: 'convert 3 MiB zlib qcow2 -> raw (fixed costs)', bytes: 3 * MiB, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('small-zlib.qcow2'), out('12a')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('small-zlib.qcow2'), out('12b')) },
    { name: '12-small-zstd-to-raw', description: 'convert 3 MiB zstd qcow2 -> raw (fixed costs)', bytes: 3 * MiB, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('small-zstd.qcow2'), out('12c')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('small-zstd.qcow2'), out('12d')) },
    { name: '13-chain3-to-raw', description: 'convert the top of a 3-image qcow2 chain (512 MiB) -> raw', bytes: mixedSize, ours: ours('convert', '-f', 'qcow2', '-O', 'raw', p('chain-top.qcow2'), out('13a')), theirs: qimg('convert', '-f', 'qcow2', '-O', 'raw', p('chain-top.qcow2'), out('13b')) },
    { name: '3-raw-random-to-qcow2', description: 'convert 1 GiB raw (random) -> qcow2', bytes: allocSize, ours: ours('convert', '-f', 'raw', '-O', 'qcow2', p('alloc.raw'), out('3i')), theirs: qimg('convert', '-f', 'raw', '-O', 'qcow2', p('alloc.raw'), out('3j')) },
    ...encrypted.map((f, i): Workload => ({
      name: `14-${f.split('.')[0]}-to-raw`,
      description: `convert 512 MiB ${f.startsWith('luks') ? 'LUKS' : 'AES'}-encrypted qcow2 (mixed) -> raw`,
      bytes: mixedSize,
      ours: ours('convert', '--password-file', p('pass.txt'), '-f', 'qcow2', '-O', 'raw', p(f), out(`14${'ac'[i]}`)),
      theirs: qimg('convert', ...secret, '--image-opts', `driver=qcow2,file.filename=${p(f)},encrypt.key-secret=sec0`, '-O', 'raw', out(`14${'bd'[i]}`)),
    })),
    { name: '6-qcow-zlib-to-raw', description: 'convert 512 MiB compressed qcow v1 -> raw', bytes: mixedSize, ours: ours('convert', '-f', 'qcow', '-O', 'raw', p('zlib.qcow'), out('6c')), theirs: qimg('convert', '-f', 'qcow', '-O', 'raw', p('zlib.qcow'), out('6d')) },
  ];
  for (const [label, extra] of [
    ['read-4k-d1', ['-s', '4k', '-d', '1', '-c', '20000']],
    ['read-4k-d32', ['-s', '4k', '-d', '32', '-c', '100000']],
    ['read-64k-d1', ['-s', '64k', '-d', '1', '-c', '8000']],
    ['read-64k-d32', ['-s', '64k', '-d', '32', '-c', '16000']],
    ['write-4k-d1', ['-w', '-s', '4k', '-d', '1', '-c', '20000']],
    ['write-64k-d32', ['-w', '-s', '64k', '-d', '32', '-c', '16000']],
  ] as const) {
    const count = Number(extra[extra.indexOf('-c') + 1]);
    const size = (extra as readonly string[]).includes('4k') ? 4096 : 65536;
    workloads.push({
      name: `5-bench-${label}`,
      description: `bench ${extra.join(' ')} on an allocated qcow2`,
      bytes: count * size,
      ours: ours('bench', '-f', 'qcow2', ...extra, p('bench.qcow2')),
      theirs: qimg('bench', '-f', 'qcow2', ...extra, p('bench.qcow2')),
    });
  }
  // L2 cache misses on every request, read-only and writable (a writable image's misses evict
  // differently: only the writer writes dirty tables back).
  for (const [label, extra] of [
    ['wide-read-4k-d1', ['-s', '4k', '-d', '1', '-c', '20000']],
    ['wide-read-4k-d32', ['-s', '4k', '-d', '32', '-c', '20000']],
    ['wide-write-4k-d32', ['-w', '-s', '4k', '-d', '32', '-c', '20000']],
  ] as const) {
    workloads.push({
      name: `5-bench-${label}`,
      description: `bench ${extra.join(' ')} -S 512M on a 1 TiB qcow2 with one cluster per L2 table`,
      bytes: 20000 * 4096,
      ours: ours('bench', '-f', 'qcow2', ...extra, '-S', '512M', p('wide.qcow2')),
      theirs: qimg('bench', '-f', 'qcow2', ...extra, '-S', '512M', p('wide.qcow2')),
    });
  }
  workloads.push({
    name: '5-bench-alloc-write-64k-d32',
    description: 'bench -w -s 64k -d 32 on an empty qcow2 (allocating writes)',
    bytes: 8000 * 65536,
    ours: ours('bench', '-f', 'qcow2', '-w', '-s', '64k', '-d', '32', '-c', '8000', p('empty-a.qcow2')),
    theirs: qimg('bench', '-f', 'qcow2', '-w', '-s', '64k', '-d', '32', '-c', '8000', p('empty-b.qcow2')),
  });

  const results: Result[] = [];
  for (const w of workloads) {
    if (!want(w.name)) continue;
    const ourRuns: Sample[] = [];
    const theirRuns: Sample[] = [];
    try {
      for (let r = 0; r < args.reps; r++) {
        if (w.name.includes('alloc-write')) {
          for (const f of ['empty-a.qcow2', 'empty-b.qcow2']) await sh('qemu-img', ['create', '-q', '-f', 'qcow2', p(f), '1G']);
        }
        // Who goes first follows ABBA (ours-theirs, theirs-ours, theirs-ours, ours-theirs, ...),
        // not plain alternation: on this VM every other pair of 1 GiB writes ran 3-8x slower
        // (freed memory that the host has reclaimed, it seems: any program, dd included, was
        // slow in those pairs), and with plain alternation the same side always went first in
        // the slow pairs. ABBA puts each side first and second equally often in both kinds.
        const order = r % 4 === 0 || r % 4 === 3 ? (['ours', 'theirs'] as const) : (['theirs', 'ours'] as const);
        for (const who of order) {
          const spec = w[who];
          // Dirty pages left by the run before would be written back during this one, slowing
          // whichever comes next at random: start every run with none (not timed).
          await sh('sync', []);
          // And with the inputs in the page cache, where the figures say they are: this VM's
          // kernel pages out file pages idle for a minute (DAMON), so the first run after a pause
          // read part of its 1 GiB source from disk (vmstat: ~90 MB/s in, 3 s instead of 0.4).
          await warm(spec.args.filter((a) => a.startsWith(dir) && !a.startsWith(out(''))));
          if (args.rest > 0) await new Promise((resolve) => setTimeout(resolve, args.rest * 1000));
          if (args.warmPagesMiB > 0) await warmPages(args.warmPagesMiB);
          const sample = await (args.machineCpu ? measureWithMachine : measure)(spec.cmd, spec.args, spec.okCodes);
          (who === 'ours' ? ourRuns : theirRuns).push(sample);
        }
        for (const f of 'abcdefghij') await rm(out(`${w.name.split('-')[0]}${f}`), { force: true });
      }
    } catch (e) {
      console.log(`${w.name.padEnd(30)} FAILED: ${(e as Error).message.split('\n')[0]}`);
      continue;
    }
    const om = median(ourRuns.map((x) => x.seconds));
    const tm = median(theirRuns.map((x) => x.seconds));
    const oc = median(ourRuns.map((x) => x.cpu));
    const tc = median(theirRuns.map((x) => x.cpu));
    const pairs = (f: (x: Sample) => number) => median(ourRuns.map((x, i) => f(x) / f(theirRuns[i]!)));
    const res: Result = {
      name: w.name,
      description: w.description,
      bytes: w.bytes,
      ours: { median: om, rssMiB: Math.max(...ourRuns.map((x) => x.rssKiB)) / 1024, runs: ourRuns.map((x) => x.seconds), cpuMedian: oc, cpuRuns: ourRuns.map((x) => x.cpu) },
      theirs: { median: tm, rssMiB: Math.max(...theirRuns.map((x) => x.rssKiB)) / 1024, runs: theirRuns.map((x) => x.seconds), cpuMedian: tc, cpuRuns: theirRuns.map((x) => x.cpu) },
      ratio: om / tm,
      pairRatio: pairs((x) => x.seconds),
      cpuRatio: tc > 0 ? pairs((x) => x.cpu) : undefined,
      bestRatio: Math.min(...ourRuns.map((x) => x.seconds)) / Math.min(...theirRuns.map((x) => x.seconds)),
      bestCpuRatio: tc > 0 ? Math.min(...ourRuns.map((x) => x.cpu)) / Math.min(...theirRuns.map((x) => x.cpu)) : undefined,
    };
    if (args.machineCpu) {
      res.ours.machineCpuMedian = median(ourRuns.map((x) => x.machineCpu ?? 0));
      res.theirs.machineCpuMedian = median(theirRuns.map((x) => x.machineCpu ?? 0));
      res.machineCpuRatio = pairs((x) => x.machineCpu ?? 0);
    }
    results.push(res);
    const mbps = (sec: number) => `${(w.bytes / MiB / sec).toFixed(0)} MiB/s`;
    const machine = res.machineCpuRatio === undefined ? '' : `  machine cpu ours ${res.ours.machineCpuMedian!.toFixed(2)}s qemu ${res.theirs.machineCpuMedian!.toFixed(2)}s ratio ${res.machineCpuRatio.toFixed(2)}`;
    console.log(
      `${w.name.padEnd(30)} ours ${om.toFixed(3)}s cpu ${oc.toFixed(3)}s (${mbps(om)}, ${res.ours.rssMiB.toFixed(0)} MiB RSS)  qemu ${tm.toFixed(3)}s cpu ${tc.toFixed(3)}s (${mbps(tm)}, ${res.theirs.rssMiB.toFixed(0)} MiB RSS)  ratio ${res.ratio.toFixed(2)}${res.cpuRatio === undefined ? '' : ` cpu ${res.cpuRatio.toFixed(2)}`}${machine}`,
    );
  }
  if (want('0-startup')) {
    // Fixed costs: each short command beside `node -e 0` (bench/startup.ts has the details).
    const { benchStartup, startupTable } = await import('./startup.js');
    const r = await benchStartup({ reps: Math.max(7, args.reps * 3) });
    console.log(`\n# start-up (${r.reps} rounds, CPU from ${r.cpuSource}; target: 15 ms beyond node -e 0)\n${startupTable(r)}\n`);
  }
  if (want('7-nbd')) {
    // Served by `qcow serve` and qemu-nbd on copies of the same image, read and written whole with
    // nbdcopy (bench/nbd.ts keeps the best of `reps` runs of each).
    const { benchNbd } = await import('./nbd.js');
    for (const format of ['qcow2', 'raw']) {
      try {
        const r = await benchNbd({ format, sizeMiB: Math.max(16, Math.round(256 * args.scale)), runs: args.reps });
        for (const [kind, c] of [['read', r.read], ['write', r.write]] as const) {
          if (!c) continue;
          const res: Result = {
            name: `7-nbd-${format}-${kind}`,
            description: `nbdcopy ${kind === 'read' ? 'reads the whole export' : 'writes a whole raw file into the export'} (${format}, ${(r.sizeBytes / MiB).toFixed(0)} MiB, best of ${args.reps})`,
            bytes: r.sizeBytes,
            ours: { median: c.ours.seconds, rssMiB: 0, runs: [c.ours.seconds] },
            theirs: { median: c.qemu.seconds, rssMiB: 0, runs: [c.qemu.seconds] },
            ratio: c.ours.seconds / c.qemu.seconds,
            bestRatio: c.ours.seconds / c.qemu.seconds,
          };
          results.push(res);
          console.log(`${res.name.padEnd(30)} ours ${c.ours.seconds.toFixed(3)}s (${c.ours.mibPerSec.toFixed(0)} MiB/s)  qemu-nbd ${c.qemu.seconds.toFixed(3)}s (${c.qemu.mibPerSec.toFixed(0)} MiB/s)  ratio ${res.ratio.toFixed(2)}`);
        }
      } catch (e) {
        console.log(`${`7-nbd-${format}`.padEnd(30)} FAILED: ${(e as Error).message.split('\n')[0]}`);
      }
    }
  }
  printSummary(results);
  await mkdir('bench-results', { recursive: true });
  await writeFile('bench-results/latest.json', JSON.stringify({ date: new Date().toISOString(), reps: args.reps, scale: args.scale, rest: args.rest, warmPagesMiB: args.warmPagesMiB, machineCpu: args.machineCpu, results }, null, 2) + '\n');
  console.log('results written to bench-results/latest.json');
  if (!args.keep) {
    for (const f of ['empty-a.qcow2', 'empty-b.qcow2']) await rm(p(f), { force: true });
  }
}

/**
 * Issue 21's targets, each a ratio ours/qemu-img (lower is better): every convert at or below
 * qemu-img's CPU seconds, and its wall time too from 1 GiB of data on; `bench` (qemu-img bench's
 * workload) at or below qemu-img's time at depth 1 and 32.
 */
interface Target {
  wall?: number;
  cpu?: number;
}
function target(name: string, bytes: number): Target | undefined {
  if (/^([12346]|1[0-4])-/.test(name)) return { cpu: 1.0, ...(bytes >= 2 ** 30 ? { wall: 1.0 } : {}) };
  if (/^5-bench-/.test(name)) return { wall: 1.0 };
  return undefined;
}

/** "met" / "MISSED" for each bound of a target. */
function verdict(t: Target, r: Result): string {
  const parts: string[] = [];
  if (t.wall !== undefined) parts.push(`wall <= ${t.wall.toFixed(1)} ${r.ratio <= t.wall ? 'met' : 'MISSED'}`);
  if (t.cpu !== undefined && r.cpuRatio !== undefined) parts.push(`cpu <= ${t.cpu.toFixed(1)} ${r.cpuRatio <= t.cpu ? 'met' : 'MISSED'}`);
  return parts.length > 0 ? `  target ${parts.join(', ')}` : '';
}

/** One line per result with its target, and the lines the issue asks for besides the ratios. */
function printSummary(results: Result[]): void {
  if (results.length === 0) return;
  console.log('\n# summary (ratio = ours / qemu time of the medians, lower is better; best = fastest run against fastest run; cpu = median of the rounds\' CPU-second ratios; best cpu = lowest CPU against lowest CPU)');
  for (const r of results) {
    const t = target(r.name, r.bytes);
    const rssLimit = r.name.startsWith('4-') ? 200 : 300;
    const rss = r.ours.rssMiB > 0 ? `  RSS ${r.ours.rssMiB.toFixed(0)} MiB ${r.ours.rssMiB < rssLimit ? 'ok' : `OVER ${rssLimit}`}` : '';
    console.log(`${r.name.padEnd(30)} ${r.ratio.toFixed(2).padStart(6)}  best ${r.bestRatio.toFixed(2).padStart(5)}${r.cpuRatio === undefined ? '' : `  cpu ${r.cpuRatio.toFixed(2).padStart(5)}`}${r.bestCpuRatio === undefined ? '' : `  best cpu ${r.bestCpuRatio.toFixed(2).padStart(5)}`}${r.machineCpuRatio === undefined ? '' : `  machine cpu ${r.machineCpuRatio.toFixed(2).padStart(5)}`}${t === undefined ? '' : verdict(t, r)}${rss}`);
  }
  const raw = results.find((r) => r.name === '0-raw-copy');
  const w1 = results.find((r) => r.name === '1-qcow2-to-raw');
  if (raw && w1) {
    // Both halves of workload 0 are cp: the machine's own limit is their median.
    const limit = median([...raw.ours.runs, ...raw.theirs.runs]);
    const x = w1.ours.median / limit;
    console.log(`${'workload 1 vs raw copy'.padEnd(30)} ${x.toFixed(2).padStart(6)}  target <= 1.5 ${x <= 1.5 ? 'met' : 'MISSED'}  (ours ${w1.ours.median.toFixed(3)}s, cp ${limit.toFixed(3)}s)`);
  }
}

main().catch((e) => {
  console.error(`bench: ${(e as Error).message}`);
  process.exitCode = 1;
});
