/**
 * Guest writes whose data write fails (blkdebug inject-error on write_aio: EIO or ENOSPC), through
 * compat/qemu-io and through qemu-io on copies of the same image: the same output and exit code,
 * and `qemu-img check` of each image afterwards says the same. QEMU aborts the allocation of a
 * failed write (its L2 entries are never written, its clusters are freed), so the image stays
 * consistent; ours used to write entries pointing at clusters that were never written.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** qemu-io's output without its timing lines. */
const untimed = (s: string) => s.split('\n').filter((l) => !/ ops; /.test(l)).join('\n');

interface Case {
  /** The blkdebug event the rule waits for (write_aio when not given). */
  event?: string;
  errno: 5 | 28;
  once: 'on' | 'off';
  /** qemu-img create options. */
  create: string;
  /** The virtual size (64M when not given). */
  size?: string;
  /** qemu-io's own cache mode (writethrough) instead of the iotests' writeback. */
  writethrough?: boolean;
  /** qemu-io commands run on the plain image first. */
  setup?: string[];
  /** Commands run over blkdebug. */
  commands: string[];
  /**
   * Leave check's "Image end offset" out: with once=off QEMU has written the new L2 table and its
   * L1 entry before the data write fails, where ours were still in the cache (both images clean).
   */
  anyEnd?: boolean;
  /**
   * Leave the allocation line and the content out: a write whose flush failed may have landed
   * (ours keeps it; QEMU's abort dropped it). Both images must still check clean.
   */
  anyContent?: boolean;
}

async function both(t: { after(fn: () => Promise<void>): void }, c: Case): Promise<void> {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', c.create, base, c.size ?? '64M']);
  if (c.setup) await run('qemu-io', [...c.setup.flatMap((x) => ['-c', x]), base]);
  const conf = join(dir, 'blkdebug.conf');
  await writeFile(conf, `[inject-error]\nevent = "${c.event ?? 'write_aio'}"\nerrno = "${c.errno}"\nonce = "${c.once}"\n`);
  const results = [];
  for (const [i, prog] of [COMPAT_QEMU_IO, 'qemu-io'].entries()) {
    const img = join(dir, `img${i}.qcow2`);
    await copyFile(base, img);
    const r = await run(prog, [...(c.writethrough ? [] : ['-t', 'writeback']), ...c.commands.flatMap((x) => ['-c', x]), `blkdebug:${conf}:${img}`]);
    const check = await run('qemu-img', ['check', img]);
    let checkOut = c.anyEnd ? check.stdout.replace(/^Image end offset: .*\n/m, '') : check.stdout;
    if (c.anyContent) checkOut = checkOut.replace(/^.* allocated, .*\n/m, '');
    results.push({ code: r.code, out: untimed(r.stdout), err: r.stderr.replaceAll(img, 'IMG'), check: checkOut.replaceAll(img, 'IMG'), checkCode: check.code });
  }
  assert.deepEqual(results[0], results[1]);
  assert.equal(results[0]!.checkCode, 0, results[0]!.check);
  if (c.anyContent) return;
  assert.equal((await run('qemu-img', ['compare', join(dir, 'img0.qcow2'), join(dir, 'img1.qcow2')])).code, 0);
}

for (const errno of [5, 28] as const) {
  test(`write_aio errno ${errno}: a failed write of fresh clusters in one L2 table leaves the image clean`, needs('qemu-io', 'qemu-img'), async (t) => {
    await both(t, { errno, once: 'on', create: 'cluster_size=1024', commands: ['write 0 128k', 'read -P 0 0 128k'] });
  });
}

test('write_aio once=off: every write and the flushes at close fail, the image stays clean', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, { errno: 28, once: 'off', create: 'cluster_size=1024', commands: ['write 0 128k'], anyEnd: true });
});

test('write_aio: a failed write over several L2 tables is undone, and the same write then lands without leaks', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, { errno: 5, once: 'on', create: 'cluster_size=1024', commands: ['write -P 1 0 1M', 'read -P 0 0 1M', 'write -P 2 0 1M', 'read -P 2 0 1M'] });
});

test('write_aio: a failed partial-cluster write (copy-on-write into a new cluster) frees the cluster', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, { errno: 5, once: 'on', create: 'cluster_size=65536', setup: ['write -P 1 0 64k'], commands: ['write 65k 1k', 'read -P 0 64k 64k', 'write -P 3 256k 64k'] });
});

test('write_aio: a failed overwrite of a preallocated zero cluster leaves it a zero cluster', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, { errno: 5, once: 'on', create: 'cluster_size=1024', setup: ['write 0 1k', 'write -z 0 1k'], commands: ['write 0 1k', 'read -P 0 0 1k'] });
});

test('write_aio: compressed and zero writes emit no write_aio and succeed, as in QEMU', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, { errno: 5, once: 'off', create: 'cluster_size=65536', commands: ['write -c -P 5 0 64k', 'write -z 64k 64k', 'read -P 5 0 64k'] });
});

// In writethrough mode (each write flushed, as qemu-io runs by default): the refcount write-back of
// the write's own flush fails. With writeback QEMU still fails the write (it writes the refcount
// blocks back before each new L2 table) where ours fails only the flush at close.
for (const once of ['on', 'off'] as const) {
  test(`refblock_update_part once=${once}: a failed refcount block write-back fails the write, and the image stays clean`, needs('qemu-io', 'qemu-img'), async (t) => {
    await both(t, { event: 'refblock_update_part', errno: 5, once, create: 'cluster_size=1024', size: '1G', commands: ['write 0 128k'], anyEnd: true, anyContent: once === 'on', writethrough: true });
  });
}

// QEMU tells refblock_alloc at every refcount update (its block looked up, found or made), so a rule
// on it fails the request after an allocation: the data write, whose allocation is then undone.
for (const once of ['on', 'off'] as const) {
  test(`refblock_alloc once=${once}: the write after the allocation fails, and the image stays clean`, needs('qemu-io', 'qemu-img'), async (t) => {
    await both(t, { event: 'refblock_alloc', errno: 5, once, create: 'cluster_size=1024', size: '1G', commands: ['write 0 128k'], anyEnd: true, writethrough: true });
  });
}
