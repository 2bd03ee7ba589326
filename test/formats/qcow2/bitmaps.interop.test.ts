/**
 * Persistent dirty bitmaps against QEMU, both ways: bitmaps QEMU made and dirtied read back
 * through qcow exactly as qemu-nbd exports them; writes through qcow are recorded so that QEMU
 * sees them, `qemu-img check` stays clean, and QEMU's own bitmap edits still work.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openImage } from '#src/node.js';
import type { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { needs, qcowOk, qemuImg, qemuIo, run, runOk, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

interface InfoBitmap {
  name: string;
  flags: string[];
  granularity: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function bitmaps(file: string): Promise<InfoBitmap[]> {
  const info = JSON.parse((await qemuImg(['info', '--output=json', '-f', 'qcow2', file])).stdout);
  return (info['format-specific'].data.bitmaps ?? []) as InfoBitmap[];
}

/** The dirty ranges of bitmap `name` as QEMU exports them: qemu-nbd -B, nbdinfo --map. */
async function qemuDirty(t: TestContext, dir: string, file: string, name: string): Promise<Array<[number, number]>> {
  const sock = join(dir, `q-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  const child = spawn('qemu-nbd', ['-r', '-B', name, '-f', 'qcow2', '-k', sock, '--pid-file', pidFile, file], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  t.after(() => void child.kill('SIGTERM'));
  for (let i = 0; i < 400 && !(await stat(pidFile).catch(() => undefined)); i++) await sleep(25);
  const { stdout } = await runOk('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///?socket=${sock}`]);
  // Until qemu-nbd has exited it holds the image's locks: the next qemu-io writer would fail to
  // get its write lock (seen on a loaded machine).
  child.kill('SIGTERM');
  await exited;
  return stdout
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).map(Number))
    .filter((r) => r[2] === 1)
    .map((r): [number, number] => [r[0]!, r[1]!]);
}

/** The dirty ranges qcow reads for bitmap `name`. */
async function qcowDirty(file: string, name: string): Promise<Array<[number, number]>> {
  const dev = (await openImage(file, { readOnly: true })) as Qcow2Device;
  try {
    const list = await (await dev.persistentBitmaps()).extents(name, 0, dev.size);
    return list.filter((e) => e.dirty).map((e): [number, number] => [e.offset, e.length]);
  } finally {
    await dev.close();
  }
}

async function checkClean(file: string): Promise<void> {
  const check = await run('qemu-img', ['check', '-f', 'qcow2', file]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
}

const M = 1 << 20;

test('bitmaps made and dirtied by QEMU read back through qcow exactly as qemu-nbd exports them', needs('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'q.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '64M']);
  await qemuImg(['bitmap', '--add', file, 'b64k']);
  await qemuImg(['bitmap', '--add', '-g', '512', file, 'b512']);
  await qemuImg(['bitmap', '--add', '-g', '2M', file, 'b2m']);
  await qemuIo(['-f', 'qcow2', '-c', 'write 1M 4k', '-c', 'write 10M 3M', '-c', 'write 63M 512', '-c', 'discard 40M 1M', file]);
  for (const name of ['b64k', 'b512', 'b2m']) {
    assert.deepEqual(await qcowDirty(file, name), await qemuDirty(t, dir, file, name), name);
  }
});

test('writes through qcow are recorded: QEMU sees them, check is clean, flags are restored, disabled bitmaps stay', needs('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'bm.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '64M']);
  await qemuImg(['bitmap', '--add', file, 'enabled']);
  await qemuImg(['bitmap', '--add', '--disable', file, 'disabled']);
  await qemuIo(['-f', 'qcow2', '-c', 'write 0 64k', file]);

  await qcowOk(['io', '-r', '-c', 'read 0 64k', file]);
  await qcowOk(['io', '-c', 'write -P 0x5a 2M 64k', '-c', 'write -z 8M 1M', '-c', 'discard 20M 128k', '-c', 'write 30M 1', file]);
  assert.deepEqual((await bitmaps(file)).map((b) => [b.name, b.flags]), [
    ['enabled', ['auto']],
    ['disabled', []],
  ]);
  await checkClean(file);
  const expected: Array<[number, number]> = [
    [0, 64 * 1024],
    [2 * M, 64 * 1024],
    [8 * M, M],
    [20 * M, 128 * 1024],
    [30 * M, 64 * 1024],
  ];
  assert.deepEqual(await qemuDirty(t, dir, file, 'enabled'), expected);
  assert.deepEqual(await qcowDirty(file, 'enabled'), expected);
  assert.deepEqual(await qemuDirty(t, dir, file, 'disabled'), []);

  // QEMU keeps recording on top of what qcow stored, and edits the bitmaps qcow wrote.
  await qemuIo(['-f', 'qcow2', '-c', 'write 50M 64k', file]);
  assert.deepEqual((await qcowDirty(file, 'enabled')).at(-1), [50 * M, 64 * 1024]);
  await qemuImg(['bitmap', '--merge', 'enabled', file, 'disabled']);
  assert.deepEqual(await qemuDirty(t, dir, file, 'disabled'), await qemuDirty(t, dir, file, 'enabled'));
  await qemuImg(['bitmap', '--remove', file, 'enabled']);
  assert.deepEqual((await bitmaps(file)).map((b) => b.name), ['disabled']);
  await checkClean(file);
});

test('an enabled bitmap is in use on disk while qcow holds the image for writing', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'open.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
  await qemuImg(['bitmap', '--add', file, 'b']);
  const dev = await openImage(file);
  try {
    await dev.write(0, new Uint8Array(4096).fill(7));
    await dev.flush();
    // What a crash now would leave: QEMU must treat the bitmap as inconsistent.
    const seen = await run('qemu-img', ['info', '-U', '--output=json', '-f', 'qcow2', file]);
    const list = JSON.parse(seen.stdout)['format-specific'].data.bitmaps as InfoBitmap[];
    assert.deepEqual(list[0]!.flags, ['in-use', 'auto']);
  } finally {
    await dev.close();
  }
  assert.deepEqual((await bitmaps(file))[0]!.flags, ['auto']);
  await checkClean(file);
});

test('a disabled bitmap is in use on disk too while the image is open for writing, as QEMU 7.2 marks it', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const flagsAfterAbort = async (file: string, io: string[]) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
    await qemuImg(['bitmap', '--add', file, 'on']);
    await qemuImg(['bitmap', '--add', '--disable', file, 'off']);
    // An abort leaves the flags the session put on disk, as a crash would.
    await run(io[0]!, [...io.slice(1), '-c', 'abort', file]);
    return (await bitmaps(file)).map((b) => [b.name, b.flags]);
  };
  const theirs = await flagsAfterAbort(join(dir, 'qemu.qcow2'), ['qemu-io', '-f', 'qcow2']);
  assert.deepEqual(theirs, [
    ['on', ['in-use', 'auto']],
    ['off', ['in-use']],
  ]);
  assert.deepEqual(await flagsAfterAbort(join(dir, 'ours.qcow2'), [COMPAT_QEMU_IO, '-f', 'qcow2']), theirs);

  // A clean session stores both again, flags as they were.
  const file = join(dir, 'clean.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
  await qemuImg(['bitmap', '--add', '--disable', file, 'off']);
  const dev = await openImage(file);
  try {
    const seen = await run('qemu-img', ['info', '-U', '--output=json', '-f', 'qcow2', file]);
    assert.deepEqual((JSON.parse(seen.stdout)['format-specific'].data.bitmaps as InfoBitmap[])[0]!.flags, ['in-use']);
    await dev.write(0, new Uint8Array(4096).fill(7));
  } finally {
    await dev.close();
  }
  assert.deepEqual((await bitmaps(file)).map((b) => [b.name, b.flags]), [['off', []]]);
  await checkClean(file);
});

test('bitmaps whose autoclear bit an old program cleared are ignored, and dropped on a write open, as QEMU does', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'stale.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
  await qemuImg(['bitmap', '--add', file, 'b']);
  // Clear autoclear bit 0 (header offset 88..95, big endian: the last byte).
  const { open } = await import('node:fs/promises');
  const fh = await open(file, 'r+');
  const b = new Uint8Array(1);
  await fh.read(b, 0, 1, 95);
  b[0] = b[0]! & ~1;
  await fh.write(b, 0, 1, 95);
  await fh.close();
  const ro = (await openImage(file, { readOnly: true })) as Qcow2Device;
  assert.deepEqual((await ro.persistentBitmaps()).list(), []);
  await ro.close();
  await qcowOk(['io', '-c', 'write 0 4k', file]);
  assert.deepEqual(await bitmaps(file), []);
  // The old bitmap's clusters leak (QEMU's behaviour too); nothing worse.
  const check = await run('qemu-img', ['check', '-f', 'qcow2', file]);
  assert.ok(check.code === 0 || check.code === 3, check.stdout + check.stderr);
});

test('qcow bitmap does what qemu-img bitmap does: same actions, same info, same contents, clean check', needs('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'), async (t) => {
  const dir = await scratch(t);
  const ours = join(dir, 'ours.qcow2');
  const theirs = join(dir, 'theirs.qcow2');
  const other = join(dir, 'other.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', other, '64M']);
  await qemuImg(['bitmap', '--add', other, 'o']);
  await qemuIo(['-f', 'qcow2', '-c', 'write 40M 1M', other]);
  const steps: string[][] = [
    ['--add', '-g', '128k', 'FILE', 'a'],
    ['--add', '--disable', 'FILE', 'b'],
    ['--add', 'FILE', 'gone'],
    ['WRITE'],
    ['--merge', 'a', '--disable', 'FILE', 'b'],
    ['--merge', 'o', '-b', other, '-F', 'qcow2', 'FILE', 'b'],
    ['--remove', 'FILE', 'gone'],
    ['--clear', '--enable', 'FILE', 'a'],
    ['WRITE2'],
  ];
  for (const [file, tool] of [
    [ours, 'qcow'],
    [theirs, 'qemu-img'],
  ] as const) {
    await qemuImg(['create', '-q', '-f', 'qcow2', file, '64M']);
    for (const s of steps) {
      if (s[0] === 'WRITE') await qemuIo(['-f', 'qcow2', '-c', 'write 5M 1M', '-c', 'write 33M 4k', file]);
      else if (s[0] === 'WRITE2') await qcowOk(['io', '-c', 'write 7M 64k', file]);
      else {
        const args = ['bitmap', ...s.map((a) => (a === 'FILE' ? file : a))];
        if (tool === 'qcow') await qcowOk(args);
        else await qemuImg(args);
      }
    }
  }
  assert.deepEqual(await bitmaps(ours), await bitmaps(theirs));
  await checkClean(ours);
  for (const name of ['a', 'b']) {
    const q = await qemuDirty(t, dir, theirs, name);
    assert.deepEqual(await qemuDirty(t, dir, ours, name), q, name);
    assert.deepEqual(await qcowDirty(ours, name), q, name);
  }
});

test('qcow bitmap refuses as qemu-img does, with one line naming the operation', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'e.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
  const { qcow } = await import('../../support/qemu.js');
  const cases: Array<[string[], RegExp]> = [
    [['bitmap', file, 'x'], /Need at least one of --add/],
    [['bitmap', '--remove', '-g', '64k', file, 'x'], /granularity only supported with --add/],
    [['bitmap', '--remove', file, 'x'], /Operation remove on bitmap x failed: Dirty bitmap 'x' not found/],
    [['bitmap', '--add', '-g', '1000', file, 'x'], /Operation add on bitmap x failed: Granularity must be a power of 2/],
  ];
  for (const [args, re] of cases) {
    const r = await qcow(args);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, re);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  }
  await qcowOk(['bitmap', '--add', file, 'x']);
  await qcowOk(['bitmap', '--add', '--disabled', '-g', '1M', file, 'y']);
  assert.deepEqual(await bitmaps(file), [
    { flags: ['auto'], name: 'x', granularity: 65536 },
    { flags: [], name: 'y', granularity: 1048576 },
  ]);
  const dup = await qcow(['bitmap', '--add', file, 'x']);
  assert.match(dup.stderr, /Bitmap already exists: x/);
  const v2 = join(dir, 'v2.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '16M']);
  assert.match((await qcow(['bitmap', '--add', v2, 'x'])).stderr, /Cannot store dirty bitmaps in qcow2 v2 files/);
});

test('a 4 TiB disk: scattered writes through tiny bitmap budgets are recorded exactly (QEMU agrees)', needs('qemu-img', 'qemu-nbd', 'nbdinfo'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'big.qcow2');
  const T = 2 ** 40;
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '4T']);
  await qemuImg(['bitmap', '--add', file, 'big']);
  const dev = await openImage(file, { bitmapLimits: { maxPendingRanges: 4, cacheClusters: 2 } });
  const expected: Array<[number, number]> = [];
  try {
    // 40 writes spread over the disk (each dirties one 64 KiB chunk), in shuffled order.
    const offsets = Array.from({ length: 40 }, (_, i) => Math.floor((i * 4 * T) / 40 / 65536) * 65536 + 4096);
    for (let i = 0; i < offsets.length; i++) {
      const off = offsets[(i * 17) % offsets.length]!;
      await dev.write(off, new Uint8Array(512).fill(i + 1));
    }
    for (const off of offsets) expected.push([off - 4096, 65536]);
    await dev.discard(3 * T + 2 ** 30, 2 * M);
    expected.push([3 * T + 2 ** 30, 2 * M]);
    expected.sort((a, b) => a[0] - b[0]);
    // Read back while still open: pending ranges are applied first.
    const live = await (await (dev as Qcow2Device).persistentBitmaps()).extents('big', 0, dev.size);
    assert.deepEqual(
      live.filter((e) => e.dirty).map((e) => [e.offset, e.length]),
      expected,
    );
  } finally {
    await dev.close();
  }
  assert.deepEqual(await qemuDirty(t, dir, file, 'big'), expected);
  await checkClean(file);
});

/** Set in_use on the first bitmap, as a crash while it was recording leaves it. */
async function markFirstInUse(file: string): Promise<void> {
  const { open } = await import('node:fs/promises');
  const { decodeHeader } = await import('#src/formats/qcow2/header.js');
  const fh = await open(file, 'r+');
  try {
    const head = new Uint8Array(65536);
    await fh.read(head, 0, head.length, 0);
    const at = decodeHeader(head).bitmaps!.directoryOffset + 12;
    const flags = new Uint8Array(4);
    await fh.read(flags, 0, 4, at);
    flags[3]! |= 1;
    await fh.write(flags, 0, 4, at);
  } finally {
    await fh.close();
  }
}

test('convert --bitmaps copies bitmaps as qemu-img convert --bitmaps does; broken ones refused or skipped', needs('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'), async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'src.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', src, '32M']);
  await qemuImg(['bitmap', '--add', '-g', '256k', src, 'on']);
  await qemuImg(['bitmap', '--add', src, 'off', '--disable']);
  await qemuIo(['-f', 'qcow2', '-c', 'write 3M 100k', src]);
  await qemuImg(['bitmap', '--merge', 'on', src, 'off']);
  await qemuIo(['-f', 'qcow2', '-c', 'write 20M 1M', src]);
  const ours = join(dir, 'ours.qcow2');
  const theirs = join(dir, 'theirs.qcow2');
  await qcowOk(['convert', '--bitmaps', '-f', 'qcow2', '-O', 'qcow2', src, ours]);
  await qemuImg(['convert', '--bitmaps', '-f', 'qcow2', '-O', 'qcow2', src, theirs]);
  assert.deepEqual(await bitmaps(ours), await bitmaps(theirs));
  await checkClean(ours);
  for (const name of ['on', 'off']) assert.deepEqual(await qemuDirty(t, dir, ours, name), await qemuDirty(t, dir, theirs, name), name);

  await markFirstInUse(src);
  const { qcow } = await import('../../support/qemu.js');
  const refused = await qcow(['convert', '--bitmaps', '-O', 'qcow2', src, join(dir, 'no.qcow2')]);
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, /Cannot copy inconsistent bitmap 'on'/);
  const skipped = join(dir, 'skipped.qcow2');
  const r = await qcowOk(['convert', '--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', src, skipped]);
  assert.match(r.stderr, /Skipping inconsistent bitmap 'on'/);
  assert.deepEqual((await bitmaps(skipped)).map((b) => b.name), ['off']);
  assert.match((await qcow(['convert', '--skip-broken-bitmaps', '-O', 'qcow2', src, join(dir, 'x.qcow2')])).stderr, /requires --bitmaps/);
});

test('convert --bitmaps names broken bitmaps in the order qemu-img does (last directory entry first); copies keep the source order', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'src.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', src, '16M']);
  for (const name of ['a', 'b', 'c', 'd']) await qemuImg(['bitmap', '--add', src, name]);
  await qemuImg(['bitmap', '--disable', src, 'c']);
  // A session that dies leaves the enabled ones (a, b, d) and, as QEMU 7.2 marks them, c in use.
  await run('qemu-io', ['-f', 'qcow2', '-c', 'abort', src]);
  await qemuImg(['bitmap', '--remove', src, 'c']);
  await qemuImg(['bitmap', '--add', src, 'e']);
  const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
  for (const extra of [[], ['--skip-broken-bitmaps']]) {
    const outcome = async (tool: string, target: string) => {
      const r = await run(tool, ['convert', '--bitmaps', ...extra, '-O', 'qcow2', src, join(dir, target)]);
      const list = r.code === 0 ? (await bitmaps(join(dir, target))).map((b) => [b.name, b.flags]) : [];
      return { code: r.code, stderr: r.stderr.replaceAll(target, 'T'), list };
    };
    const theirs = await outcome('qemu-img', `theirs${extra.length}.qcow2`);
    assert.match(theirs.stderr, extra.length ? /'d'[^]*'b'[^]*'a'/ : /'d'/);
    assert.deepEqual(await outcome(COMPAT_QEMU_IMG, `ours${extra.length}.qcow2`), theirs);
  }
});

test('check finds a broken bitmap table and check -r all removes the bitmap, which QEMU cannot (qemu issue 2909)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'broken.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
  await qemuImg(['bitmap', '--add', file, 'bad']);
  await qemuImg(['bitmap', '--add', file, 'good']);
  await qemuIo(['-f', 'qcow2', '-c', 'write 0 64k', file]);
  // Reserved bits in the first entry of the first bitmap's table.
  const { open } = await import('node:fs/promises');
  const { decodeHeader } = await import('#src/formats/qcow2/header.js');
  const fh = await open(file, 'r+');
  const head = new Uint8Array(65536);
  await fh.read(head, 0, head.length, 0);
  const entry = new Uint8Array(8);
  await fh.read(entry, 0, 8, decodeHeader(head).bitmaps!.directoryOffset);
  const tableAt = Number(new DataView(entry.buffer).getBigUint64(0));
  await fh.write(new Uint8Array([0x40, 0, 0, 0, 0, 0, 1, 0xfe]), 0, 8, tableAt);
  await fh.close();

  assert.notEqual((await run('qemu-img', ['bitmap', '--remove', file, 'bad'])).code, 0);
  const { qcow } = await import('../../support/qemu.js');
  const found = await qcow(['check', file]);
  assert.equal(found.code, 2);
  assert.match(found.stderr + found.stdout, /bitmap 'bad': table entry 0 is invalid/);
  const fixed = await qcow(['check', '-r', 'all', file]);
  assert.equal(fixed.code, 0, fixed.stdout + fixed.stderr);
  assert.match(fixed.stderr + fixed.stdout, /Repairing bitmap 'bad': removed/);
  await checkClean(file);
  assert.deepEqual((await bitmaps(file)).map((b) => b.name), ['good']);
});

test('check reports a directory entry QEMU refuses to open (granularity, type, flags) and check -r all removes it', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const { open } = await import('node:fs/promises');
  const { decodeHeader } = await import('#src/formats/qcow2/header.js');
  const { qcow } = await import('../../support/qemu.js');
  // Byte offset inside the first directory entry, value, and what the check says about it.
  const cases: [number, number, RegExp][] = [
    [17, 40, /bitmap 'bad' cannot be used: granularity bits 40 out of range/],
    [17, 8, /bitmap 'bad' cannot be used: granularity bits 8 out of range/],
    [16, 2, /bitmap 'bad' cannot be used: unknown bitmap type 2/],
    [12, 0x80, /bitmap 'bad' cannot be used: unknown flags 0x80000000/],
  ];
  for (const [at, value, said] of cases) {
    const file = join(dir, `entry-${at}-${value}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', file, '16M']);
    await qemuImg(['bitmap', '--add', file, 'bad']);
    await qemuImg(['bitmap', '--add', file, 'good']);
    const fh = await open(file, 'r+');
    const head = new Uint8Array(65536);
    await fh.read(head, 0, head.length, 0);
    await fh.write(new Uint8Array([value]), 0, 1, decodeHeader(head).bitmaps!.directoryOffset + at);
    await fh.close();

    const refused = await run('qemu-img', ['info', file]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /Bitmap 'bad' doesn't satisfy the constraints/);
    const found = await qcow(['check', file]);
    assert.equal(found.code, 2, found.stdout + found.stderr);
    assert.match(found.stderr + found.stdout, said);
    const fixed = await qcow(['check', '-r', 'all', file]);
    assert.equal(fixed.code, 0, fixed.stdout + fixed.stderr);
    assert.match(fixed.stderr + fixed.stdout, /Repairing bitmap 'bad': removed/);
    await checkClean(file);
    assert.deepEqual((await bitmaps(file)).map((b) => b.name), ['good']);
  }
});
