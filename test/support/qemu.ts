/**
 * Test helpers that run the real QEMU tools, and the one marker for tests that need them:
 * `test(name, needs('qemu-img', ...), fn)`. When a tool is missing, such tests are skipped
 * locally but fail under CI=true: a CI run that silently skipped interop would prove nothing.
 *
 * `QCOW_TEST_WITHOUT=qemu` (or a list: `qemu-img,nbdinfo`) runs the suite as on a machine
 * without those tools, even under CI: every test that needs one is skipped, and everything else
 * must pass without it. `qemu` stands for the QEMU and libnbd tools ({@link QEMU_TOOLS}).
 */
import { execFile, spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';

/** The external tools the interop tests drive, with the Debian package that has each. */
const PACKAGES: Record<string, string> = {
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  'qemu-system-x86_64': 'qemu-system-x86',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  busybox: 'busybox-static',
  nginx: 'nginx-light',
  chromium: 'chromium',
  openssl: 'openssl',
  python3: 'python3',
};

/** What `qemu` names in QCOW_TEST_WITHOUT: the QEMU tools and the libnbd clients. */
export const QEMU_TOOLS: readonly string[] = ['qemu-img', 'qemu-io', 'qemu-nbd', 'qemu-system-x86_64', 'nbdinfo', 'nbdcopy'];

/** The tools QCOW_TEST_WITHOUT hides from this run. */
const hidden = new Set(
  (process.env.QCOW_TEST_WITHOUT ?? '')
    .split(',')
    .map((t) => t.trim())
    .flatMap((t) => (t === 'qemu' ? QEMU_TOOLS : t ? [t] : [])),
);

const available = new Map<string, boolean>();

/** Whether `tool` is on PATH (and not hidden by QCOW_TEST_WITHOUT). */
export function hasTool(tool: string): boolean {
  // A path hides as its tool does (/usr/sbin/nginx as nginx).
  if (hidden.has(tool.slice(tool.lastIndexOf('/') + 1))) return false;
  let v = available.get(tool);
  if (v === undefined) {
    v = spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
    available.set(tool, v);
  }
  return v;
}

/**
 * Options for a test that needs `tools`: `{ skip }` when one is missing outside CI, or hidden by
 * QCOW_TEST_WITHOUT. Under CI a test whose tool is really missing runs and fails loudly on it.
 */
export function needs(...tools: string[]): { skip?: string } {
  const missing = tools.filter((t) => !hasTool(t));
  if (missing.length === 0) return {};
  if (missing.some((t) => hidden.has(t))) return { skip: `QCOW_TEST_WITHOUT hides ${missing.filter((t) => hidden.has(t)).join(', ')}` };
  if (process.env.CI === 'true') return {};
  const packages = [...new Set(missing.map((t) => PACKAGES[t] ?? t))];
  return { skip: `missing ${missing.join(', ')} (install ${packages.join(', ')})` };
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * qemu-img sizes a new LUKS key slot by timing PBKDF2 against its thread's CPU clock, and gives up
 * with this line when the clock has not moved (coarse accounting on a busy VM): a property of the
 * machine at that instant, not of the test, so the command is run again, a little later each
 * time (8 tries at most: 3 back to back once failed under CI's load beside other jobs).
 */
const QEMU_CPU_CLOCK_FLAKE = 'Unable to get accurate CPU usage';

/** Run a program; resolves with its exit code and output (never rejects on a non-zero exit). */
export async function run(cmd: string, args: string[], options: { cwd?: string; input?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  for (let attempt = 1; ; attempt++) {
    const r = await runOnce(cmd, args, options);
    if (r.code === 0 || attempt === 8 || !r.stderr.includes(QEMU_CPU_CLOCK_FLAKE)) return r;
    await new Promise((resolve) => setTimeout(resolve, 50 * attempt));
  }
}

function runOnce(cmd: string, args: string[], options: { cwd?: string; input?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv }): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      cmd,
      args,
      { cwd: options.cwd, maxBuffer: 256 * 1024 * 1024, timeout: options.timeoutMs ?? 120_000, env: options.env ?? process.env },
      (err, stdout, stderr) => {
        const code = err && typeof (err as NodeJS.ErrnoException).code === 'number' ? ((err as unknown as { code: number }).code) : err ? (err.killed ? 124 : -1) : 0;
        if (err && code === -1 && (err as NodeJS.ErrnoException).code === 'ENOENT') reject(new Error(`${cmd} is not installed`));
        else resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      },
    );
    if (options.input !== undefined) child.stdin?.end(options.input);
  });
}

/** Run and require exit 0, with the output in the failure message otherwise. */
export async function runOk(cmd: string, args: string[], options: { cwd?: string; input?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  const r = await run(cmd, args, options);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}\n${r.stderr}${r.stdout}`);
  return r;
}

/**
 * qemu-io's output with its timing lines masked ("64 KiB, 1 ops; 00:00:00.01 (6.25 MiB/sec and
 * 100 ops/sec)" differs from run to run, ours as QEMU's), so two runs compare equal.
 */
export function maskQemuIoTiming(out: string): string {
  return out.replace(/(?:\d\d:)*\d\d\.\d\d(?: sec)? \([^)]*\/sec\)/g, 'TIMING');
}

export const qemuImg = (args: string[], cwd?: string) => runOk('qemu-img', args, { cwd });

/** A QEMU qemu-io holding an image open for writing (holdWithQemuIo). */
export interface QemuIoHolder {
  /** The probe that failed once the locks were held, for tests that check QEMU's own message. */
  refused: RunResult;
  /** Ends the holder (quit on its stdin) and waits for it to exit; also done when the test ends. */
  release(): Promise<void>;
}

/**
 * QEMU's qemu-io holding `img` open for writing (waiting on its stdin) until released or the test
 * ends. Returns once the image is open, which it learns from the answer to a `length` command
 * (printed only after the open), then runs `probe` (by default QEMU's own `qemu-img info`, a shared
 * read) once, which must fail on the locks. Probing while qemu-io starts would race it: a probe
 * holding its own lock at the moment qemu-io opens the image makes qemu-io's open fail.
 */
export async function holdWithQemuIo(t: TestContext, img: string, probe: [string, string[]] = ['qemu-img', ['info', img]]): Promise<QemuIoHolder> {
  const writer = spawn('qemu-io', ['-f', 'qcow2', img], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  writer.stdout.on('data', (d: Buffer) => (out += d.toString()));
  writer.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const release = async (): Promise<void> => {
    if (writer.exitCode !== null || writer.signalCode !== null) return;
    writer.stdin.end('quit\n');
    await once(writer, 'exit');
  };
  t.after(release);
  writer.stdin.write('length\n');
  const opened = new Promise<void>((resolve, reject) => {
    const onData = () => {
      if (!/\d/.test(out)) return;
      writer.stdout.off('data', onData);
      writer.off('exit', onExit);
      resolve();
    };
    const onExit = () => reject(new Error(`qemu-io could not open ${img}: ${err.trim()}`));
    writer.stdout.on('data', onData);
    writer.once('exit', onExit);
  });
  await opened;
  const refused = await run(...probe);
  if (refused.code === 0) throw new Error(`${probe[0]} ${probe[1].join(' ')} succeeded beside qemu-io holding ${img}`);
  return { refused, release };
}
export const qemuIo = (args: string[], cwd?: string) => runOk('qemu-io', args, { cwd });

/** The CLI's node entry (bin/qcow.cjs, running the bundle of dist/cli), for `node CLI ...`. */
export const CLI = fileURLToPath(new URL('../../bin/qcow.cjs', import.meta.url));
/** The `qcow` command as npm installs it: the shell launcher bin/qcow, which runs CLI under node. */
export const QCOW_BIN = fileURLToPath(new URL('../../bin/qcow', import.meta.url));
/** Run the `qcow` command, as a user would. */
export const qcow = (args: string[], options: { cwd?: string; input?: string; timeoutMs?: number } = {}) => run(QCOW_BIN, args, options);
export async function qcowOk(args: string[], options: { cwd?: string } = {}): Promise<RunResult> {
  const r = await qcow(args, options);
  if (r.code !== 0) throw new Error(`qcow ${args.join(' ')} exited ${r.code}\n${r.stderr}${r.stdout}`);
  return r;
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * SHA-256 of an image's guest content as qemu-img sees it (qemu-img convert -O raw to a temp
 * file). `openArgs` are qemu-img input arguments, e.g. ['-f', 'qcow2', 'x.qcow2'].
 */
export async function qemuGuestSha256(openArgs: string[], cwd?: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'qcow-sha-'));
  try {
    const out = join(dir, 'out.raw');
    await runOk('qemu-img', ['convert', '-O', 'raw', ...openArgs, out], { cwd });
    return sha256(await readFile(out));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** SHA-256 of a device's guest content as we read it. */
export async function deviceSha256(dev: { size: number; read(off: number, into: Uint8Array): Promise<void> }): Promise<string> {
  const h = createHash('sha256');
  const chunk = new Uint8Array(4 * 1024 * 1024);
  for (let off = 0; off < dev.size; off += chunk.length) {
    const n = Math.min(chunk.length, dev.size - off);
    const view = chunk.subarray(0, n);
    await dev.read(off, view);
    h.update(view);
  }
  return h.digest('hex');
}

/** A scratch folder removed when the test ends. */
export async function scratch(t: TestContext | { after(fn: () => Promise<void>): void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'qcow-test-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Deterministic pseudo-random bytes (incompressible), from a seed. */
export function randomBytes(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Set a qcow2 image's corrupt bit (incompatible feature bit 1: byte 79 of the header), as QEMU does when it finds corruption. */
export async function markCorrupt(file: string): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    await fh.write(new Uint8Array([2]), 0, 1, 79);
  } finally {
    await fh.close();
  }
}

/** One entry of `qemu-img map --output=json`, as qemu-img prints it. */
export interface QemuMapExtent {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  compressed?: boolean;
  offset?: number;
}
