/**
 * Image locks against QEMU's own programs: qemu-io, qemu-nbd and qemu-img holding an image keep
 * qcow out as they keep each other out, and qcow holding one keeps them out; the lock bytes qcow
 * takes are those QEMU takes, read from /proc/locks. Needs the host addon (skipped with
 * QCOW_NO_NATIVE=1; under CI=true a missing addon fails).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { hostAddon } from '#src/host/native.node.js';
import { needs, qcow, QCOW_BIN, qemuImg, run, scratch, sha256 } from '../support/qemu.js';
import { needsQemuLocks } from '../support/addon.js';

function lockTests(): { skip?: string } {
  const locks = needsQemuLocks();
  if (locks.skip) return locks;
  return needs('qemu-img', 'qemu-io', 'qemu-nbd');
}

/** The lock bytes held on `path` by anyone, as "100-101 201 203" (sorted ranges). */
function lockBytes(path: string): string {
  const ino = statSync(path).ino;
  const ranges: [number, number][] = [];
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    // "1: OFDLCK  ADVISORY  READ -1 fd:01:2188433 100 101"
    const f = line.trim().split(/\s+/);
    if (f.length < 8 || Number(f[5]!.split(':')[2]) !== ino) continue;
    ranges.push([Number(f[6]), Number(f[7])]);
  }
  const bytes = new Set<number>();
  for (const [a, b] of ranges) for (let i = a; i <= b; i++) bytes.add(i);
  return [...bytes].sort((a, b) => a - b).join(' ');
}

interface Holder {
  child: ChildProcess;
  stop(): Promise<void>;
}

/** Wait (without a deadline) until `ready()`, failing if the child exits first. */
async function until(child: ChildProcess, what: string, ready: () => boolean, stderr: () => string): Promise<void> {
  while (!ready()) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${what} exited before it was ready: ${stderr()}`);
    await delay(20);
  }
}

function holder(cmd: string, args: string[], ready: (out: string) => boolean, stopWith: 'stdin' | 'kill'): Promise<Holder> {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const h: Holder = {
    child,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        if (stopWith === 'stdin') child.stdin!.end();
        // SIGKILL: a qemu-nbd sent SIGTERM while still starting up was seen to ignore it; the
        // kernel drops the locks of a killed process all the same.
        else child.kill('SIGKILL');
      }
      await exited;
    },
  };
  return until(child, cmd, () => ready(out), () => err).then(() => h);
}

/**
 * qemu-io with the image open, waiting for commands on a pipe (it quits when the pipe closes);
 * ready once its locks are on the image (its output is buffered until it exits).
 */
async function qemuIoHoldsReady(args: string[]): Promise<Holder> {
  const image = args[args.length - 1]!;
  const child = spawn('qemu-io', args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  await until(child, 'qemu-io', () => lockBytes(image) !== '', () => err + out);
  return {
    child,
    stop: async () => {
      child.stdin!.end();
      await exited;
    },
  };
}

/** An NBD server (qemu-nbd or qcow serve) on a unix socket; ready once the socket exists. */
function serverHolds(cmd: string, args: string[], socket: string): Promise<Holder> {
  // Before the image, after `serve` (qemu-nbd takes options anywhere).
  const at = args.length - 1;
  return holder(cmd, [...args.slice(0, at), '-k', socket, ...args.slice(at)], () => existsSync(socket), 'kill');
}

test('qemu-io writing an image: qcow may not write it, and reads it only with -U, as qemu-img', lockTests(), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  const before = sha256(await readFile(img));
  const q = await qemuIoHoldsReady([img]);
  try {
    const w = await qcow(['io', '-c', 'write -P 1 0 512', img]);
    assert.equal(w.code, 1);
    assert.match(w.stderr, /^qcow: .*disk\.qcow2: Failed to get "write" lock: is another process using the image\?\n$/);
    const info = await qcow(['info', img]);
    assert.equal(info.code, 1);
    assert.match(info.stderr, /^qcow: .*disk\.qcow2: Failed to get shared "write" lock: is another process using the image\?\n$/);
    // qemu-img says the same, word for word the permission.
    const qinfo = await run('qemu-img', ['info', img]);
    assert.notEqual(qinfo.code, 0);
    assert.match(qinfo.stderr, /Failed to get shared "write" lock/);
    // -U: shared reads.
    const infoU = await qcow(['info', '-U', img]);
    assert.equal(infoU.code, 0, infoU.stderr);
    const readU = await qcow(['io', '-r', '-U', '-c', 'read -P 0 0 512', img]);
    assert.equal(readU.code, 0, readU.stderr);
  } finally {
    await q.stop();
  }
  assert.equal(sha256(await readFile(img)), before, 'the image is unchanged');
  // Once qemu-io is gone, qcow writes.
  const w = await qcow(['io', '-c', 'write -P 1 0 512', img]);
  assert.equal(w.code, 0, w.stderr);
});

test('qemu-io reading an image (no -U): qcow may read it but not write it', lockTests(), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  const q = await qemuIoHoldsReady(['-r', img]);
  try {
    const w = await qcow(['io', '-c', 'write -P 1 0 512', img]);
    assert.equal(w.code, 1);
    assert.match(w.stderr, /Failed to get "write" lock/);
    const r = await qcow(['io', '-r', '-c', 'read -P 0 0 512', img]);
    assert.equal(r.code, 0, r.stderr);
  } finally {
    await q.stop();
  }
});

test('qemu-nbd exporting an image and its backing file: qcow writes neither; info needs -U', lockTests(), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  const sums = [sha256(await readFile(base)), sha256(await readFile(top))];
  const nbd = await serverHolds('qemu-nbd', ['-f', 'qcow2', top], join(dir, 'nbd.sock'));
  try {
    for (const img of [top, base]) {
      const w = await qcow(['io', '-c', 'write -P 1 0 512', img]);
      assert.equal(w.code, 1, `${img} written`);
      assert.match(w.stderr, /Failed to get "write" lock/);
    }
    assert.match((await qcow(['info', top])).stderr, /Failed to get shared "write" lock/);
    assert.equal((await qcow(['info', '-U', '--backing-chain', top])).code, 0);
    // Reading the backing file is fine (qemu-nbd reads it too).
    assert.equal((await qcow(['io', '-r', '-c', 'read 0 512', base])).code, 0);
  } finally {
    await nbd.stop();
  }
  assert.deepEqual([sha256(await readFile(base)), sha256(await readFile(top))], sums);
});

test('qcow serve holding an image: qemu-img info and qemu-io writes are refused with their usual message', lockTests(), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  const srv = await serverHolds(QCOW_BIN, ['serve', top], join(dir, 'qcow.sock'));
  try {
    const info = await run('qemu-img', ['info', top]);
    assert.equal(info.code, 1);
    assert.match(info.stderr, /Failed to get shared "write" lock\nIs another process using the image \[.*top\.qcow2\]\?/);
    assert.equal((await run('qemu-img', ['info', '-U', top])).code, 0);
    for (const img of [top, base]) {
      const w = await run('qemu-io', ['-c', 'write 0 512', img]);
      assert.notEqual(w.code, 0);
      assert.match(w.stderr, /Failed to get "write" lock/);
    }
    // The backing file may still be read by others.
    assert.equal((await run('qemu-io', ['-r', '-c', 'read 0 512', base])).code, 0);
  } finally {
    await srv.stop();
  }
  // Released with the process.
  assert.equal((await run('qemu-io', ['-c', 'write 0 512', top])).code, 0);
});

test('qcow serve -r: qemu-io may not write the image, qemu-img info may read it', lockTests(), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  const srv = await serverHolds(QCOW_BIN, ['serve', '-r', img], join(dir, 'qcow.sock'));
  try {
    assert.match((await run('qemu-io', ['-c', 'write 0 512', img])).stderr, /Failed to get "write" lock/);
    assert.equal((await run('qemu-img', ['info', img])).code, 0);
  } finally {
    await srv.stop();
  }
});

test('qcow takes the lock bytes qemu-nbd takes, for every kind of file it opens', lockTests(), async (t) => {
  const dir = await scratch(t);
  const p = (f: string) => join(dir, f);
  await qemuImg(['create', '-q', '-f', 'qcow2', p('base.qcow2'), '1M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', p('base.qcow2'), '-F', 'qcow2', p('top.qcow2')]);
  await qemuImg(['create', '-q', '-f', 'raw', p('disk.raw'), '1M']);
  await qemuImg(['create', '-q', '-f', 'raw', p('rawbase.raw'), '1M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', p('rawbase.raw'), '-F', 'raw', p('overraw.qcow2')]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${p('data.raw')}`, p('ext.qcow2'), '1M']);
  const files = ['base.qcow2', 'top.qcow2', 'disk.raw', 'rawbase.raw', 'overraw.qcow2', 'ext.qcow2', 'data.raw'].map(p);
  const cases: [string[], string[]][] = [
    [['-f', 'qcow2'], ['top.qcow2']],
    [['-r', '-f', 'qcow2'], ['top.qcow2']],
    [['-f', 'raw'], ['disk.raw']],
    [['-r', '-f', 'raw'], ['disk.raw']],
    [['-f', 'qcow2'], ['overraw.qcow2']],
    [['-f', 'qcow2'], ['ext.qcow2']],
    [['-r', '-f', 'qcow2'], ['ext.qcow2']],
    // Probed, not named: the locks wait for the probe, and come out the same.
    [[], ['top.qcow2']],
  ];
  let n = 0;
  for (const [flags, [image]] of cases) {
    const seen: string[] = [];
    for (const [cmd, args] of [
      ['qemu-nbd', flags.length ? flags : ['-f', 'qcow2']],
      [QCOW_BIN, ['serve', ...flags]],
    ] as const) {
      const socket = p(`s${n++}.sock`);
      const h = await serverHolds(cmd, [...args, p(image!)], socket);
      try {
        // The socket may come before the last file is opened: wait until the locks stay put.
        const now = () => files.map((f) => `${f.slice(dir.length + 1)}: ${lockBytes(f)}`).join('; ');
        let last = now();
        for (let same = 0; same < 10; ) {
          await delay(20);
          const next = now();
          same = next === last ? same + 1 : 0;
          last = next;
        }
        seen.push(last);
      } finally {
        await h.stop();
      }
    }
    assert.equal(seen[1], seen[0], `qcow serve ${flags.join(' ')} ${image}`);
  }
});

test('raw images are shared as QEMU shares them: a qemu-io writer and a qcow writer may both write', lockTests(), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'disk.raw');
  await qemuImg(['create', '-q', '-f', 'raw', img, '1M']);
  const q = await qemuIoHoldsReady(['-f', 'raw', img]);
  try {
    const w = await qcow(['io', '-f', 'raw', '-c', 'write -P 7 0 512', img]);
    assert.equal(w.code, 0, w.stderr);
    // But not as a qcow2 image would be: a qcow2 writer refuses readers, raw does not.
    assert.equal((await qcow(['io', '-f', 'raw', '-r', '-c', 'read -P 7 0 512', img])).code, 0);
  } finally {
    await q.stop();
  }
});

test('with the addon disabled, qcow falls back to its lock file, which QEMU does not see', needs('qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  const env = { ...process.env, QCOW_NO_NATIVE: '1' };
  const v = await run(QCOW_BIN, ['--version'], { env });
  assert.match(v.stdout, /image locking: qcow lock files/);
  assert.match(v.stdout, /\ncodecs: node:zlib \(zlib [^)]+\); zstd: WebAssembly decoding, WebAssembly encoding\n$/);
  const q = await qemuIoHoldsReady([img]);
  try {
    // Not refused: the documented gap of the fallback.
    const r = await run(QCOW_BIN, ['info', img], { env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(lockBytes(img), '100 101 103 201 203', 'only qemu-io holds locks');
  } finally {
    await q.stop();
  }
});

test('qcow --version says which locking and which codecs are in use', lockTests(), async () => {
  const v = await qcow(['--version']);
  const addon = hostAddon();
  const zlib = typeof addon?.inflateRaw === 'function' ? /zlib [\d.]+ through the host addon/ : /node:zlib/;
  const zstd = (addon?.zstdVersion?.() ?? 0) > 0 ? /libzstd \d+\.\d+\.\d+ decoding/ : /WebAssembly decoding/;
  const m = /^\d+\.\d+\.\d+\nimage locking: QEMU-compatible \(OFD byte-range locks\)\ncodecs: ([^\n]+)\n$/.exec(v.stdout);
  assert.ok(m, v.stdout);
  assert.match(m[1]!, zlib);
  assert.match(m[1]!, zstd);
});
