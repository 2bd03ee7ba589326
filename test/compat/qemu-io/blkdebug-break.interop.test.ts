/**
 * qemu-io's breakpoints on a blkdebug node (`break EVENT TAG`, `wait_break`, `resume`,
 * `remove_break`), against QEMU's qemu-io: the same commands, fed on stdin as the iotests feed
 * them, give the same output (timings left out; the completions of requests that run at the same
 * time may come in either order, so their offsets are left out too where asked) and an image
 * with the same content that checks clean.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

interface Case {
  /** Makes the image to copy (`img`) in `dir`. */
  setup: (dir: string, img: string) => Promise<void>;
  /** qemu-io's arguments, given the image. */
  args: (img: string) => string[];
  /** On stdin; IMG_PATH stands for the image's path. */
  commands: string[];
  /** Leave the offsets of completions out (they may come in either order). */
  anyOrder?: boolean;
  /** What the image must read afterwards: qemu-io read commands. */
  verify?: string[];
}

function normal(out: string, img: string, anyOrder: boolean): string {
  let s = out
    .split('\n')
    .filter((l) => !/ ops; /.test(l))
    .join('\n')
    .replaceAll(img, 'IMG');
  if (anyOrder) s = s.replace(/\d+\/\d+ bytes at offset \d+/g, 'N/N bytes at offset N');
  return s;
}

async function both(t: { after(fn: () => Promise<void>): void }, c: Case): Promise<void> {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  await c.setup(dir, base);
  const results = [];
  for (const [i, prog] of [COMPAT_QEMU_IO, 'qemu-io'].entries()) {
    const img = join(dir, `img${i}.qcow2`);
    await copyFile(base, img);
    const input = c.commands.map((x) => x.replaceAll('IMG_PATH', img)).join('\n') + '\n';
    const r = await run(prog, c.args(img), { input, timeoutMs: 60_000 });
    const check = await run('qemu-img', ['check', img]);
    const verify = c.verify ? await run('qemu-io', [...c.verify.flatMap((v) => ['-c', v]), img]) : undefined;
    results.push({
      code: r.code,
      out: normal(r.stdout, img, c.anyOrder ?? false),
      err: r.stderr.replaceAll(img, 'IMG'),
      check: check.stdout.replaceAll(img, 'IMG'),
      verify: verify && normal(verify.stdout + verify.stderr, img, false),
    });
  }
  assert.deepEqual(results[0], results[1]);
  assert.ok(!results[0]!.verify?.includes('Pattern verification failed'), results[0]!.verify);
  assert.equal((await run('qemu-img', ['compare', join(dir, 'img0.qcow2'), join(dir, 'img1.qcow2')])).code, 0);
}

const blank = (size = '16M', opts: string[] = []) => async (_dir: string, img: string) => {
  await qemuImg(['create', '-q', '-f', 'qcow2', ...opts, img, size]);
};

test('break write_aio: the request waits for resume, later ones touching its cluster wait for it (iotest 046)', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    setup: async (dir, img) => {
      const backing = join(dir, 'backing.qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', backing, '16M']);
      await qemuIo(['-c', 'write -P 1 0 1M', backing]);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', img, '16M']);
    },
    args: (img) => [`blkdebug::${img}`],
    commands: [
      'break write_aio A',
      'aio_write -P 10 0x18000 0x2000',
      'wait_break A',
      'aio_write -P 11 0x12000 0x2000',
      'aio_write -P 12 0x1c000 0x2000',
      'resume A',
      'aio_flush',
      'break write_aio A',
      'aio_write -P 20 0x28000 0x2000',
      'wait_break A',
      'aio_write -P 21 0x2a000 0x10000',
      'resume A',
      'aio_flush',
    ],
    anyOrder: true,
    verify: [
      'read -P 1 0x10000 0x2000',
      'read -P 11 0x12000 0x2000',
      'read -P 1 0x14000 0x4000',
      'read -P 10 0x18000 0x2000',
      'read -P 1 0x1a000 0x2000',
      'read -P 12 0x1c000 0x2000',
      'read -P 20 0x28000 0x2000',
      'read -P 21 0x2a000 0x10000',
      'read -P 1 0x3a000 0x6000',
    ],
  });
});

test('break write_aio on whole fresh clusters: an overlapping write waits, its completion comes after', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    setup: async (_dir, img) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '16M']);
      await qemuIo(['-c', 'write -P 1 0 4k', img]);
    },
    args: (img) => ['-f', 'qcow2', `blkdebug::${img}`],
    commands: ['break write_aio A', 'aio_write -P 2 64k 16k', 'wait_break A', 'aio_write -P 3 68k 4k', 'resume A', 'aio_flush', 'read -P 2 64k 4k', 'read -P 3 68k 4k', 'read -P 2 72k 8k'],
  });
});

test('break read_aio suspends a read; remove_break resumes what it suspended', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    setup: async (_dir, img) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', img, '16M']);
      await qemuIo(['-c', 'write -P 7 0 64k', img]);
    },
    args: (img) => [`blkdebug::${img}`],
    commands: ['break read_aio R', 'aio_read -P 7 0 4k', 'wait_break R', 'remove_break R', 'aio_flush', 'read -P 7 4k 4k'],
  });
});

test('breakpoint errors: an unknown event, an unknown tag to resume or remove', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    setup: blank(),
    args: (img) => [`blkdebug::${img}`],
    commands: ['break no_such_event A', 'resume A', 'remove_break A', 'break write_aio B', 'remove_break B', 'remove_break B', 'write -P 1 0 4k'],
  });
});

test('breakpoints without a blkdebug node are not supported', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    setup: blank(),
    args: (img) => [img],
    commands: ['break write_aio A', 'resume A', 'remove_break A', 'write -P 1 0 4k'],
  });
});

test('open -o file.driver=blkdebug IMG puts blkdebug under the format, where breakpoints act', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    setup: blank(),
    args: () => [],
    commands: ['open -o file.driver=blkdebug IMG_PATH', 'break write_aio A', 'aio_write -P 5 0 4k', 'wait_break A', 'resume A', 'aio_flush', 'read -P 5 0 4k'],
  });
});

test('a read of a cluster whose allocating write is held at a breakpoint fails with one line, not a silent exit 0', needs('qemu-io', 'qemu-img'), async (t) => {
  // Reads wait for an allocation in flight on their clusters (docs/compatibility.md); here only
  // the `resume` after the read would release it. QEMU's qemu-io reads the old data instead (its
  // L2 entry is not yet set at write_aio); ours cannot, and must not end as if all went well.
  const dir = await scratch(t);
  const img = join(dir, 'img.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  const input = ['break write_aio A', 'aio_write -P 1 0 64k', 'wait_break A', 'read -P 0 0 4k', 'resume A', 'aio_flush'].join('\n') + '\n';
  const r = await run(COMPAT_QEMU_IO, [`blkdebug::${img}`], { input, timeoutMs: 60_000 });
  assert.equal(r.code, 1);
  assert.match(r.stdout, /blkdebug: Suspended request 'A'/);
  assert.equal(r.stderr, "qemu-io: 'read -P 0 0 4k' cannot complete: it waits for a request that nothing will resume\n");
  assert.equal((await run('qemu-img', ['check', img])).code, 0);
});
