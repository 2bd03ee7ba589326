/**
 * `qcow serve -B NAME` against `qemu-nbd -B NAME`: the qemu:dirty-bitmap:NAME context maps the
 * same through nbdinfo, read-only and while the export is written (the bitmap records the NBD
 * client's writes as qemu-nbd's does), base:allocation still answers, and a missing or
 * inconsistent bitmap is refused before serving.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { CLI, needs, qcow, qemuImg, qemuIo, runOk, scratch } from '../support/qemu.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Start a server (qcow serve or qemu-nbd) on a Unix socket; its nbd URI once it listens. */
async function start(t: TestContext, dir: string, cmd: 'qcow' | 'qemu-nbd', args: string[]): Promise<string> {
  const sock = join(dir, `${cmd}-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  const child =
    cmd === 'qcow'
      ? spawn(process.execPath, [CLI, 'serve', '-t', '-k', sock, '--pid-file', pidFile, ...args], { stdio: 'ignore' })
      : spawn('qemu-nbd', ['-t', '-k', sock, '--pid-file', pidFile, ...args], { stdio: 'ignore' });
  const exited = new Promise((r) => child.once('exit', r));
  t.after(async () => {
    child.kill('SIGTERM');
    await Promise.race([exited, sleep(10_000)]);
  });
  for (let i = 0; i < 400 && !(await stat(pidFile).catch(() => undefined)); i++) await sleep(25);
  return `nbd+unix:///?socket=${sock}`;
}

async function map(uri: string, context: string): Promise<string> {
  return (await runOk('nbdinfo', [`--map=${context}`, uri])).stdout;
}

test('qcow serve -B maps qemu:dirty-bitmap:NAME as qemu-nbd -B does, read-only and while written', needs('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'b.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '64M']);
  await qemuImg(['bitmap', '--add', '-g', '128k', file, 'b']);
  await qemuIo(['-f', 'qcow2', '-c', 'write 1M 4k', '-c', 'write 9M 3M', '-c', 'discard 40M 1M', file]);

  const ours = await start(t, dir, 'qcow', ['-r', '-B', 'b', file]);
  const theirs = await start(t, dir, 'qemu-nbd', ['-r', '-f', 'qcow2', '-B', 'b', file]);
  assert.equal(await map(ours, 'qemu:dirty-bitmap:b'), await map(theirs, 'qemu:dirty-bitmap:b'));
  assert.equal(await map(ours, 'base:allocation'), await map(theirs, 'base:allocation'));
});

test('a writable qcow serve -B records its client writes in the exported bitmap', needs('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'w.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '64M']);
  await qemuImg(['bitmap', '--add', file, 'b']);
  const ours = await start(t, dir, 'qcow', ['-B', 'b', file]);
  await runOk('qemu-io', ['-f', 'raw', '-c', 'write 5M 64k', '-c', 'write -z 20M 1M', ours]);
  const live = await map(ours, 'qemu:dirty-bitmap:b');
  assert.match(live, /5242880\s+65536\s+1\s+dirty/);
  assert.match(live, /20971520\s+1048576\s+1\s+dirty/);
});

test('qcow serve -B refuses a missing or inconsistent bitmap with one line', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'm.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
  const missing = await qcow(['serve', '-r', '-B', 'nope', '-k', join(dir, 's.sock'), file]);
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, /Dirty bitmap 'nope' not found/);
  assert.equal(missing.stderr.trim().split('\n').length, 1);
});
