/**
 * Fixed costs (issue 21): every `qcow` command that has little work to do, beside Node's own
 * start (`node -e 0`) on the same machine, in one run. What is left after Node's start is ours;
 * the target is 15 ms of wall and of CPU time.
 *
 *   node dist-bench/startup.js [--reps N] [--warmup N] [--only info,convert-zlib] [--dir DIR] [--json FILE]
 *
 * Each round runs every command once right after (or right before: ABBA order over rounds) a
 * `node -e 0`, and the figure for a command is the median over the rounds of its difference to
 * that neighbouring baseline run: on a 2-core VM shared with other jobs, load changes within
 * seconds, and two runs side by side see the same load. CPU time is user + sys of the whole
 * process tree, from `perf stat`'s task-clock (nanoseconds) where perf works, else GNU time's
 * rusage (10 ms steps: use more rounds), else not measured.
 *
 * `node -e 0` runs without NODE_EXTRA_CA_CERTS (Node parses that file before any JavaScript, a
 * cost the `qcow` launcher avoids, see bin/qcow); the commands run with the environment as it is.
 */
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs as parseCliArgs } from 'node:util';

const QCOW = fileURLToPath(new URL('../bin/qcow', import.meta.url));
const COMPAT = fileURLToPath(new URL('../compat/', import.meta.url));
const MiB = 2 ** 20;
/** The issue's bound on what a command with little work may add to Node's start, in seconds. */
export const TARGET_SECONDS = 0.015;

export interface StartupOptions {
  /** Rounds (each: every command beside a baseline run). Default 20. */
  reps?: number;
  /** Untimed rounds first (page cache, CPU frequency). Default 3. */
  warmup?: number;
  /** Only the commands whose names start with one of these. */
  only?: string[];
  /** Where the small images are made (kept between runs). Default: a folder in the temp dir. */
  dir?: string;
}

interface Sample {
  wall: number;
  /** CPU seconds, NaN when neither perf nor GNU time is there to measure them. */
  cpu: number;
}

export interface StartupRow {
  name: string;
  command: string;
  /** Medians over the rounds, seconds. */
  wall: number;
  cpu: number;
  /** Medians over the rounds of (this command - the `node -e 0` beside it), seconds. */
  wallOver: number;
  cpuOver: number;
  /** qemu-img (qemu-io) doing the same, medians, seconds. */
  qemu?: { wall: number; cpu: number };
}

export interface StartupReport {
  date: string;
  reps: number;
  /** How CPU time was measured: 'perf' (task-clock), 'time' (GNU time) or 'none'. */
  cpuSource: 'perf' | 'time' | 'none';
  node: { wall: number; cpu: number };
  rows: StartupRow[];
}

type Meter = (cmd: string, args: string[], env: NodeJS.ProcessEnv) => Promise<Sample>;

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null; err: string; wall: number }> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, err, wall: Number(process.hrtime.bigint() - t0) / 1e9 }));
  });
}

/** perf stat's counters for the command alone (its own start is outside them): CPU and wall. */
function perfMeter(logFile: string): Meter {
  return async (cmd, args, env) => {
    const r = await run('perf', ['stat', '-x', ',', '-o', logFile, '-e', 'task-clock,duration_time', '--', cmd, ...args], env);
    if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.err.trim().split('\n')[0]}`);
    const text = readFileSync(logFile, 'utf8');
    const field = (event: string) => {
      const line = text.split('\n').find((l) => l.split(',')[2]?.startsWith(event));
      const v = line ? Number(line.split(',')[0]) : NaN;
      if (!Number.isFinite(v)) throw new Error(`perf stat gave no ${event} for ${cmd}`);
      return v;
    };
    // task-clock is in milliseconds, duration_time in nanoseconds.
    return { cpu: field('task-clock') / 1e3, wall: field('duration_time') / 1e9 };
  };
}

function timeMeter(): Meter {
  return async (cmd, args, env) => {
    const r = await run('/usr/bin/time', ['-f', '__CPU__%U %S', cmd, ...args], env);
    const m = /__CPU__([\d.]+) ([\d.]+)/.exec(r.err);
    if (r.code !== 0 || !m) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.err.trim().split('\n')[0]}`);
    return { cpu: Number(m[1]) + Number(m[2]), wall: r.wall };
  };
}

function wallMeter(): Meter {
  return async (cmd, args, env) => {
    const r = await run(cmd, args, env);
    if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.err.trim().split('\n')[0]}`);
    return { cpu: NaN, wall: r.wall };
  };
}

async function pickMeter(dir: string): Promise<{ meter: Meter; source: StartupReport['cpuSource'] }> {
  const perf = perfMeter(join(dir, 'perf.log'));
  try {
    await perf('true', [], process.env);
    return { meter: perf, source: 'perf' };
  } catch {
    // No perf, or perf_event_paranoid forbids it.
  }
  if (existsSync('/usr/bin/time')) return { meter: timeMeter(), source: 'time' };
  return { meter: wallMeter(), source: 'none' };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
};

/** The small images: 3 MiB of half random, half text-like data, plain and compressed. */
async function makeImages(dir: string, meter: Meter): Promise<void> {
  const p = (f: string) => join(dir, f);
  const sh = (cmd: string, ...args: string[]) => meter(cmd, args, process.env);
  if (!existsSync(p('small.raw'))) {
    const data = Buffer.alloc(3 * MiB);
    const text = Buffer.from('The quick brown fox jumps over the lazy dog; qcow start-up data 0123456789.\n');
    for (let off = 0; off < data.length; off += 256 * 1024) {
      if ((off / (256 * 1024)) % 2 === 0) randomFillSync(data, off, 256 * 1024);
      else for (let q = off; q < off + 256 * 1024; q += text.length) text.copy(data, q, 0, Math.min(text.length, off + 256 * 1024 - q));
    }
    await writeFile(p('small.raw'), data);
  }
  if (!existsSync(p('plain.qcow2'))) await sh('qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', p('small.raw'), p('plain.qcow2'));
  if (!existsSync(p('zlib.qcow2'))) await sh('qemu-img', 'convert', '-c', '-f', 'raw', '-O', 'qcow2', p('small.raw'), p('zlib.qcow2'));
  if (!existsSync(p('zstd.qcow2'))) await sh('qemu-img', 'convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', p('small.raw'), p('zstd.qcow2'));
  // A 64 MiB disk with 3 MiB written and one internal snapshot: what info, check, map and
  // snapshot -l are usually pointed at.
  if (!existsSync(p('disk.qcow2'))) {
    await sh('qemu-img', 'create', '-q', '-f', 'qcow2', p('disk.tmp'), '64M');
    await sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x5a 0 3M', '-c', 'write -z 8M 1M', p('disk.tmp'));
    await sh('qemu-img', 'snapshot', '-c', 'first', p('disk.tmp'));
    await sh('mv', p('disk.tmp'), p('disk.qcow2'));
  }
}

/** Time the commands against `node -e 0`; see the file comment. */
export async function benchStartup(options: StartupOptions = {}): Promise<StartupReport> {
  const reps = options.reps ?? 20;
  const warmup = options.warmup ?? 3;
  const dir = options.dir ?? join(tmpdir(), 'qcow-startup');
  await mkdir(dir, { recursive: true });
  const { meter, source } = await pickMeter(dir);
  await makeImages(dir, meter);
  const p = (f: string) => join(dir, f);
  const q = (...a: string[]) => ({ cmd: QCOW, args: a });
  const img = (...a: string[]) => ({ cmd: 'qemu-img', args: a });
  // Each with qemu-img doing the same, where it can: the work itself, start-up aside, is what a
  // command with real work (a compressing convert) cannot get under.
  const commands: Array<{ name: string; cmd: string; args: string[]; qemu?: { cmd: string; args: string[] } }> = [
    { name: 'info', ...q('info', p('disk.qcow2')), qemu: img('info', p('disk.qcow2')) },
    { name: 'info-json', ...q('info', '--output=json', p('disk.qcow2')), qemu: img('info', '--output=json', p('disk.qcow2')) },
    { name: 'check', ...q('check', p('disk.qcow2')), qemu: img('check', p('disk.qcow2')) },
    { name: 'map', ...q('map', p('disk.qcow2')), qemu: img('map', p('disk.qcow2')) },
    { name: 'measure', ...q('measure', '-O', 'qcow2', p('disk.qcow2')), qemu: img('measure', '-O', 'qcow2', p('disk.qcow2')) },
    { name: 'create', ...q('create', '-q', '-f', 'qcow2', p('out-create.qcow2'), '1G'), qemu: img('create', '-q', '-f', 'qcow2', p('out-create-q.qcow2'), '1G') },
    { name: 'snapshot-l', ...q('snapshot', '-l', p('disk.qcow2')), qemu: img('snapshot', '-l', p('disk.qcow2')) },
    { name: 'compare', ...q('compare', p('plain.qcow2'), p('zlib.qcow2')), qemu: img('compare', p('plain.qcow2'), p('zlib.qcow2')) },
    { name: 'convert-plain', ...q('convert', '-O', 'raw', p('plain.qcow2'), p('out-plain.raw')), qemu: img('convert', '-O', 'raw', p('plain.qcow2'), p('out-q.raw')) },
    { name: 'convert-zlib', ...q('convert', '-O', 'raw', p('zlib.qcow2'), p('out-zlib.raw')), qemu: img('convert', '-O', 'raw', p('zlib.qcow2'), p('out-q.raw')) },
    { name: 'convert-zstd', ...q('convert', '-O', 'raw', p('zstd.qcow2'), p('out-zstd.raw')), qemu: img('convert', '-O', 'raw', p('zstd.qcow2'), p('out-q.raw')) },
    // Into qcow2 without compression: the writer's start (allocator, refcounts, L2 tables) with
    // little data, what convert -c pays before its deflating.
    { name: 'convert-qcow2', ...q('convert', '-O', 'qcow2', p('plain.qcow2'), p('out-p.qcow2')), qemu: img('convert', '-O', 'qcow2', p('plain.qcow2'), p('out-q.qcow2')) },
    { name: 'convert-c', ...q('convert', '-c', '-O', 'qcow2', p('plain.qcow2'), p('out-c.qcow2')), qemu: img('convert', '-c', '-O', 'qcow2', p('plain.qcow2'), p('out-q.qcow2')) },
    { name: 'compat-qemu-img-info', cmd: join(COMPAT, 'qemu-img'), args: ['info', p('disk.qcow2')], qemu: img('info', p('disk.qcow2')) },
    { name: 'compat-qemu-io-read', cmd: join(COMPAT, 'qemu-io'), args: ['-c', 'read 0 64k', p('disk.qcow2')], qemu: { cmd: 'qemu-io', args: ['-c', 'read 0 64k', p('disk.qcow2')] } },
  ].filter((c) => !options.only || options.only.some((o) => c.name.startsWith(o)));

  const baseEnv = { ...process.env };
  delete baseEnv.NODE_EXTRA_CA_CERTS;
  const baseline = () => meter(process.execPath, ['-e', '0'], baseEnv);

  const node: Sample[] = [];
  const samples = commands.map(() => ({ own: [] as Sample[], over: [] as Sample[], qemu: [] as Sample[] }));
  for (let round = -warmup; round < reps; round++) {
    for (const [i, c] of commands.entries()) {
      // ABBA over the rounds: the baseline goes first in half of them.
      const baseFirst = ((round + warmup) % 4 === 0 || (round + warmup) % 4 === 3) !== (i % 2 === 1);
      const b1 = baseFirst ? await baseline() : undefined;
      const s = await meter(c.cmd, c.args, process.env);
      const b = b1 ?? (await baseline());
      const theirs = c.qemu && (await meter(c.qemu.cmd, c.qemu.args, process.env));
      if (round < 0) continue;
      if (theirs) samples[i]!.qemu.push(theirs);
      node.push(b);
      samples[i]!.own.push(s);
      samples[i]!.over.push({ wall: s.wall - b.wall, cpu: s.cpu - b.cpu });
    }
  }
  const rows = commands.map((c, i): StartupRow => {
    const { own, over, qemu } = samples[i]!;
    return {
      name: c.name,
      command: [c.cmd === QCOW ? 'qcow' : c.cmd.startsWith(COMPAT) ? `compat/${c.cmd.slice(COMPAT.length)}` : c.cmd, ...c.args.map((a) => (a.startsWith(dir) ? a.slice(dir.length + 1) : a))].join(' '),
      wall: median(own.map((x) => x.wall)),
      cpu: median(own.map((x) => x.cpu)),
      wallOver: median(over.map((x) => x.wall)),
      cpuOver: median(over.map((x) => x.cpu)),
      ...(qemu.length > 0 ? { qemu: { wall: median(qemu.map((x) => x.wall)), cpu: median(qemu.map((x) => x.cpu)) } } : {}),
    };
  });
  for (const f of ['out-create.qcow2', 'out-create-q.qcow2', 'out-plain.raw', 'out-zlib.raw', 'out-zstd.raw', 'out-c.qcow2', 'out-p.qcow2', 'out-q.raw', 'out-q.qcow2', 'perf.log']) await rm(p(f), { force: true });
  return { date: new Date().toISOString(), reps, cpuSource: source, node: { wall: median(node.map((x) => x.wall)), cpu: median(node.map((x) => x.cpu)) }, rows };
}

const ms = (s: number) => (Number.isNaN(s) ? 'n/a' : (s * 1000).toFixed(1));

/** The report as a Markdown table (docs/performance.md has one of these). */
export function startupTable(r: StartupReport): string {
  const ok = (x: number) => (Number.isNaN(x) ? '' : x <= TARGET_SECONDS ? '' : ' (over)');
  const lines = [
    `| command | wall ms | CPU ms | wall beyond \`node -e 0\` | CPU beyond \`node -e 0\` | qemu-img wall / CPU ms |`,
    '|---|---|---|---|---|---|',
    `| \`node -e 0\` | ${ms(r.node.wall)} | ${ms(r.node.cpu)} | | | |`,
    ...r.rows.map(
      (x) =>
        `| \`${x.command}\` | ${ms(x.wall)} | ${ms(x.cpu)} | ${ms(x.wallOver)}${ok(x.wallOver)} | ${ms(x.cpuOver)}${ok(x.cpuOver)} | ${x.qemu ? `${ms(x.qemu.wall)} / ${ms(x.qemu.cpu)}` : ''} |`,
    ),
  ];
  return lines.join('\n');
}

function parseArgs(argv: string[]): StartupOptions & { json?: string } {
  // node:util's parser: unknown options and missing values are its errors.
  const { values: v } = parseCliArgs({
    args: argv,
    options: { reps: { type: 'string' }, warmup: { type: 'string' }, only: { type: 'string' }, dir: { type: 'string' }, json: { type: 'string' } },
  });
  const o: StartupOptions & { json?: string } = {};
  if (v.reps !== undefined) o.reps = Number(v.reps);
  if (v.warmup !== undefined) o.warmup = Number(v.warmup);
  if (v.only !== undefined) o.only = v.only.split(',');
  if (v.dir !== undefined) o.dir = v.dir;
  if (v.json !== undefined) o.json = v.json;
  if (o.reps !== undefined && !(o.reps >= 1)) throw new Error('--reps must be >= 1');
  if (o.warmup !== undefined && !(o.warmup >= 0)) throw new Error('--warmup must be >= 0');
  return o;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  try {
    const o = parseArgs(process.argv.slice(2));
    const r = await benchStartup(o);
    console.log(`# qcow start-up — ${r.date} — ${r.reps} rounds, CPU from ${r.cpuSource}; target: at most ${TARGET_SECONDS * 1000} ms beyond node -e 0`);
    console.log(startupTable(r));
    const missed = r.rows.filter((x) => x.wallOver > TARGET_SECONDS || x.cpuOver > TARGET_SECONDS).map((x) => x.name);
    console.log(missed.length ? `over the target: ${missed.join(', ')}` : 'every command within the target');
    if (o.json) await writeFile(o.json, JSON.stringify(r, null, 2) + '\n');
  } catch (e) {
    console.error(`startup bench: ${(e as Error).message}`);
    process.exitCode = 1;
  }
}
