/**
 * compat/qemu-io against the real qemu-io: the same commands on two copies of one image must give
 * the same output (statistics masked, as QEMU's iotests mask them), the same exit status, and
 * images with the same guest content.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { markCorrupt, needs, qemuGuestSha256, qemuImg, run, scratch } from '../../support/qemu.js';

const OURS = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const mask = (s: string) => s.replace(/\d+ ops; [0-9:. sec]+ \([0-9.inf]+ [A-Za-z]+\/sec and [0-9.inf]+ ops\/sec\)/g, 'X ops; XX');

async function both(t: Parameters<typeof scratch>[0], format: string, create: string[], args: string[], input?: string) {
  const dir = await scratch(t);
  const a = join(dir, 'a.img');
  const b = join(dir, 'b.img');
  await qemuImg(['create', '-f', format, ...create, a, '4M']);
  await copyFile(a, b);
  const theirs = await run('qemu-io', ['-f', format, ...args, a], { input });
  const ours = await run(OURS, ['-f', format, ...args, b], { input });
  assert.equal(mask(ours.stdout), mask(theirs.stdout));
  assert.equal(ours.stderr.replaceAll(b, a), theirs.stderr);
  assert.equal(ours.code, theirs.code);
  assert.equal(await qemuGuestSha256(['-f', format, b]), await qemuGuestSha256(['-f', format, a]));
}

const SCRIPT = [
  'write -P 0x11 0 64k',
  'write -P 0x22 100k 3k',
  'write -z 512k 128k',
  'write -c 1M 64k',
  'writev -P 0x33 2M 512 1k 4k',
  'read -P 0x11 0 64k',
  'read -P 0x11 0 65k',
  'read -v 100k 40',
  'readv -P 0x33 2M 1536 4k',
  'read -P 0x22 -s 0 -l 3k 100k 4k',
  'discard 0 64k',
  'alloc 0 1M',
  'alloc 4M',
  'map',
  'length',
  'write 4M 1',
  'read -x 0 1',
  'read 0 1.5',
  'frobnicate',
  'write -u 0 1',
  'aio_write -P 0x44 3M 64k',
  'aio_flush',
  'aio_read -P 0x44 3M 32k 32k',
  'aio_flush',
  'read -P 0x44 3M 64k',
  'truncate 8M',
  'length',
];

for (const format of ['qcow2', 'qcow', 'raw']) {
  test(`${format}: a script of -c commands prints, exits and writes as qemu-io`, needs('qemu-io', 'qemu-img'), async (t) => {
    // Not compared: compressed writes and truncate (qcow2 only); discard on raw (qemu punches a
    // hole, qcow leaves the bytes: both allowed); write -z on qcow v1 (qemu writes zero clusters
    // where nothing was allocated, qcow leaves them unallocated: both read as zeros).
    const skip = (c: string) => format !== 'qcow2' && (c.startsWith('write -c') || c.startsWith('truncate') || c.startsWith('discard') || (format === 'qcow' && c.startsWith('write -z')));
    const script = SCRIPT.filter((c) => !skip(c));
    await both(t, format, [], script.flatMap((c) => ['-c', c]));
  });
}

test('commands on standard input, with the prompt, as qemu-io reads them', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, 'qcow2', [], [], 'write -P 7 0 4k\nread -P 7 0 4k\n\nread -P 8 0 4k\nquit\nread 0 1\n');
});

test('read-only opens, bad options and unknown files fail as qemu-io does', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, 'qcow2', [], ['-r', '-c', 'write 0 1', '-c', 'read 0 1']);
  const dir = await scratch(t);
  // A qcow2 image marked corrupt opens read-only, not for writing.
  const corrupt = join(dir, 'corrupt.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', corrupt, '1M']);
  await markCorrupt(corrupt);
  for (const args of [['--bogus'], ['-x'], [join(dir, 'missing.img')], ['-c', 'help'], ['-c', 'write 0 4k', corrupt], ['-r', '-c', 'read 0 4k', corrupt]]) {
    const theirs = await run('qemu-io', args);
    const ours = await run(OURS, args);
    assert.equal(ours.code, theirs.code, args.join(' '));
    assert.equal(ours.stderr, theirs.stderr, args.join(' '));
    if (args[0] === '-c' || args[0] === '-r') assert.equal(mask(ours.stdout), mask(theirs.stdout));
  }
});

test('info: the VM state offset follows the reach of an L2 table, extended L2 entries too', needs('qemu-io', 'qemu-img'), async (t) => {
  const dir = await scratch(t);
  // An extended L2 entry is 16 bytes, so a table reaches half as far: the VM state starts at the
  // next multiple of that reach past the disk. Sizes on, short of and past a table's reach.
  const cases: Array<[string, string]> = [
    ['extended_l2=on,cluster_size=2M', '1G'],
    ['extended_l2=on,cluster_size=2M', '300G'],
    ['extended_l2=on,cluster_size=16k', '5M'],
    ['extended_l2=on,cluster_size=64k', '300M'],
    ['extended_l2=off,cluster_size=2M', '300G'],
    ['extended_l2=off,cluster_size=16k', '5M'],
  ];
  for (const [options, size] of cases) {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, 'a.qcow2', size], dir);
    const theirs = await run('qemu-io', ['-f', 'qcow2', '-c', 'info', 'a.qcow2'], { cwd: dir });
    const ours = await run(OURS, ['-f', 'qcow2', '-c', 'info', 'a.qcow2'], { cwd: dir });
    assert.match(theirs.stdout, /^vm state offset: /m);
    assert.equal(ours.stdout, theirs.stdout, `${options} ${size}`);
  }
});
