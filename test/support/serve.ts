/**
 * `qcow serve` as a child process for the NBD tests: on a Unix socket in a scratch folder, ready
 * once its pid file exists (the server writes it after it listens), stopped in t.after.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { CLI } from './qemu.js';

export interface Served {
  /** nbd+unix URI of the export. */
  uri: string;
  sock: string;
  child: ChildProcess;
  /** Exit code (or signal name) once the process has ended. */
  exited: Promise<number | string>;
  /** What the server printed so far, stdout and stderr together. */
  stderr: () => string;
}

export interface ServeOptions {
  /** Export name (`-x`); the default export when empty. */
  name?: string;
  /** How long to wait for the pid file. A guest test's server starts beside a busy emulator. */
  waitMs?: number;
  /**
   * How t.after stops a server still running: 'term' sends SIGTERM and SIGKILL only after 10 s
   * (a test that expects a clean shutdown), 'kill' sends SIGKILL at once (abuse tests).
   */
  stop?: 'term' | 'kill';
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Resolves with `value` after `ms`, without keeping the process alive. */
const after = <T>(ms: number, value: T) => new Promise<T>((r) => setTimeout(() => r(value), ms).unref());
const POLL_MS = 25;

/** Start `qcow serve -k SOCKET --pid-file ... ARGS` and resolve once it listens. */
export async function serveQcow(t: TestContext, dir: string, args: string[], options: ServeOptions = {}): Promise<Served> {
  const { name = '', waitMs = 10_000, stop = 'term' } = options;
  const sock = join(dir, `nbd-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  const child = spawn(process.execPath, [CLI, 'serve', '-k', sock, '--pid-file', pidFile, ...(name ? ['-x', name] : []), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  child.stdout!.on('data', (d) => (err += d));
  const exited = new Promise<number | string>((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  let done = false;
  void exited.then(() => (done = true));
  t.after(async () => {
    if (done) return;
    if (stop === 'kill') {
      child.kill('SIGKILL');
      return;
    }
    child.kill('SIGTERM');
    if ((await Promise.race([exited, after(10_000, 'timeout')])) === 'timeout') child.kill('SIGKILL');
  });
  for (let waited = 0; waited < waitMs; waited += POLL_MS) {
    if (done) throw new Error(`qcow serve exited early: ${err}`);
    if (await stat(pidFile).catch(() => undefined)) return { uri: `nbd+unix:///${name}?socket=${sock}`, sock, child, exited, stderr: () => err };
    await sleep(POLL_MS);
  }
  throw new Error(`qcow serve did not start listening: ${err}`);
}
