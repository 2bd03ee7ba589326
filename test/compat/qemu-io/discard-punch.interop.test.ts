/**
 * When the image file gives blocks back, against QEMU 7.2. QEMU punches a cluster that a discard
 * or an unmapping zero write leaves with no reference at once, while the request runs (not at the
 * next flush), when pass-discard-request is on: by default with qemu-io, and not with -d ignore/off,
 * where a discard does nothing and a zero write never unmaps. A deleted snapshot's clusters are
 * punched too (pass-discard-snapshot), and a cluster replaced by a rewrite is not. Each case runs
 * the same commands through qemu-io/qemu-img and through ours on a fresh image, and compares the
 * bytes the file stopped occupying (the files' own sizes differ a little, for reasons of their own)
 * and what qemu-img check says afterwards. `abort` after the commands leaves only what was done
 * while they ran: the metadata caches are lost with it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { needsHoles } from '../../support/addon.js';
import { hostAddon } from '#src/host/native.node.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

/**
 * The bytes of `file` that hold data, by SEEK_DATA and SEEK_HOLE. Not st_blocks: ext4 counts in it
 * the blocks of the file's extent tree too, which grows by a block when punched holes split its
 * extents past what the inode holds, and how the data's extents come out depends on when the kernel
 * wrote the pages back (a loaded machine once gave one side 4 KiB more).
 */
async function occupied(file: string): Promise<number> {
  const addon = hostAddon();
  if (!addon) return (await stat(file)).blocks * 512;
  const fh = await open(file, 'r');
  try {
    const { size, blksize } = await fh.stat();
    let bytes = 0;
    for (let at = addon.seekData(fh.fd, 0); at >= 0 && at < size; ) {
      const end = Math.min(addon.seekHole(fh.fd, at), size);
      // A partial last block (a compressed cluster can end the file anywhere) occupies a block.
      bytes += Math.ceil(end / blksize) * blksize - at;
      at = end < size ? addon.seekData(fh.fd, end) : -1;
    }
    return bytes;
  } finally {
    await fh.close();
  }
}

interface Tools {
  io: string;
  img: string;
}
const QEMU: Tools = { io: 'qemu-io', img: 'qemu-img' };
const OURS: Tools = { io: COMPAT_IO, img: COMPAT_IMG };

/**
 * Bytes freed in the file by `steps`, and check's verdict. Before them, QEMU's own programs write
 * 2 MiB of data and run `prepare`, so that both runs start from the same file.
 */
async function freedBy(tools: Tools, dir: string, steps: (tools: Tools) => Promise<void>, prepare?: (tools: Tools) => Promise<void>): Promise<{ freed: number; check: string }> {
  const file = join(dir, 'a.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 2M', file]);
  await prepare?.(QEMU);
  const before = await occupied(file);
  await steps(tools);
  const check = await run('qemu-img', ['check', '-f', 'qcow2', file]);
  return { freed: before - (await occupied(file)), check: check.stdout + check.stderr };
}

/** qemu-io (ours or QEMU's) on a.qcow2 with `args`, then `abort`. */
const ioAborted = (dir: string, args: string[]) => async (tools: Tools) => {
  const r = await run(tools.io, ['-f', 'qcow2', ...args, '-c', 'abort', join(dir, 'a.qcow2')]);
  assert.notEqual(r.code, 0, `${tools.io} ${args.join(' ')}: abort`);
};

test('a discard or an unmapping zero write punches its clusters at once, as qemu-io does (and not with -d ignore)', { ...needs('qemu-img', 'qemu-io'), ...needsHoles() }, async (t) => {
  const dir = await scratch(t);
  const cases: Array<[string[], number]> = [
    [['-t', 'writeback', '-c', 'discard 0 1M'], 1 << 20],
    [['-t', 'writeback', '-c', 'write -z -u 64k 512k'], 512 << 10],
    [['-t', 'writeback', '-c', 'discard 32k 1M'], 960 << 10],
    [['-c', 'discard 0 1M'], 1 << 20],
    [['-t', 'writeback', '-d', 'ignore', '-c', 'discard 0 1M', '-c', 'write -z -u 1M 512k'], 0],
    [['-t', 'writeback', '-d', 'unmap', '-o', 'pass-discard-request=off', '-c', 'discard 0 1M'], 0],
  ];
  for (const [args, expected] of cases) {
    const want = await freedBy(QEMU, dir, ioAborted(dir, args));
    const got = await freedBy(OURS, dir, ioAborted(dir, args));
    assert.deepEqual(got, want, args.join(' '));
    assert.equal(want.freed, expected, `QEMU: ${args.join(' ')}`);
  }
});

test('a deleted snapshot gives its clusters back, a rewritten compressed cluster does not, as in QEMU', { ...needs('qemu-img', 'qemu-io'), ...needsHoles() }, async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'a.qcow2');
  const snapshotTaken = async (tools: Tools) => {
    await runOkQuiet(tools.img, ['snapshot', '-c', 's1', file]);
    await runOkQuiet(tools.io, ['-f', 'qcow2', '-c', 'write -P 2 0 2M', file]);
  };
  const snapshotDeleted = (tools: Tools) => runOkQuiet(tools.img, ['snapshot', '-d', 's1', file]);
  const compressedWritten = (tools: Tools) => runOkQuiet(tools.io, ['-f', 'qcow2', '-c', 'write -c -P 3 2M 64k', '-c', 'write -c -P 3 2112k 64k', file]);
  const compressedRewritten = (tools: Tools) => runOkQuiet(tools.io, ['-f', 'qcow2', '-c', 'write -P 4 2M 128k', file]);
  // What the comparison is about, stated: the snapshot's 2 MiB of data (and its tables) go; the
  // compressed cluster stays while the file grows by the rewritten 128 KiB.
  const cases = [
    ['snapshot', snapshotDeleted, snapshotTaken, (freed: number) => freed > 2 << 20],
    ['compressed', compressedRewritten, compressedWritten, (freed: number) => freed === -(128 << 10)],
  ] as const;
  for (const [what, steps, prepare, expected] of cases) {
    const want = await freedBy(QEMU, dir, steps, prepare);
    const got = await freedBy(OURS, dir, steps, prepare);
    assert.deepEqual(got, want, what);
    assert.ok(expected(want.freed), `QEMU: ${what} freed ${want.freed}`);
  }
});

test('a discard that reaches the end of an image of a partial last cluster takes that cluster too (iotest 066)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const size = String(64 * 1024 * 1024 + 512);
  const maps: string[] = [];
  for (const tools of [QEMU, OURS]) {
    const file = join(dir, 'a.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', file, size]);
    const r = await run(tools.io, ['-f', 'qcow2', '-c', 'write 0 256k', '-c', 'write 64M 512', '-c', `discard 0 ${size}`, '-c', `read -P 0 0 ${size}`, file]);
    assert.doesNotMatch(r.stdout, /verification failed/, tools.io);
    maps.push((await run('qemu-img', ['map', '--output=json', file])).stdout);
  }
  assert.equal(maps[1], maps[0]);
});

async function runOkQuiet(cmd: string, args: string[]): Promise<void> {
  const r = await run(cmd, args);
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')}: ${r.stderr}`);
}
