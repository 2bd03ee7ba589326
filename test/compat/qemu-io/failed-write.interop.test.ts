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
  /**
   * Leaked clusters are allowed (iotest 026's verdict): check's leak lines are left out and its
   * exit code 3 (leaks only) counts as clean. Where the metadata writes fail differs between QEMU
   * and us, and so does what leaks; corruption may not.
   */
  leaksAllowed?: boolean;
}

/**
 * check's report with leaks counted as none: with leaks it prints their summary where it would say
 * there were no errors, and leaves out the allocation line (the leaks' own lines go to stderr).
 */
const withoutLeaks = (s: string) => s.replace(/^\n?\d+ leaked clusters were found on the image\.\nThis means waste of disk space, but no harm to data\.\n/m, 'No errors were found on the image.\n');

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
    let checkOut = c.leaksAllowed ? withoutLeaks(check.stdout) : check.stdout;
    if (c.anyEnd) checkOut = checkOut.replace(/^Image end offset: .*\n/m, '');
    if (c.anyContent) checkOut = checkOut.replace(/^.* allocated, .*\n/m, '');
    const checkCode = c.leaksAllowed && check.code === 3 ? 0 : check.code;
    results.push({ code: r.code, out: untimed(r.stdout), err: r.stderr.replaceAll(img, 'IMG'), check: checkOut.replaceAll(img, 'IMG'), checkCode });
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

// QEMU tells refblock_load at every refcount update (the block looked up, cached or not), not when
// a count is only looked at: the failing request is the refcount write-back of the write's flush,
// and with once=off the close fails to flush both caches.
for (const once of ['on', 'off'] as const) {
  test(`refblock_load once=${once}: the write fails, and with once=off so do the flushes at close`, needs('qemu-io', 'qemu-img'), async (t) => {
    await both(t, { event: 'refblock_load', errno: 5, once, create: 'cluster_size=1024', size: '1G', commands: ['write 0 128k'], anyEnd: true, anyContent: true, leaksAllowed: true, writethrough: true });
  });
}

// A VM state write past the end of the L1 table grows it: a failure at each step of the growth
// (the table's allocation, its write, the header naming it) fails the write and leaves the image
// consistent (iotest 026's L1 growth tests).
for (const event of ['l1_grow_alloc_table', 'l1_grow_write_table', 'l1_grow_activate_table']) {
  for (const once of ['on', 'off'] as const) {
    test(`${event} once=${once}: the VM state write fails, the image stays consistent`, needs('qemu-io', 'qemu-img'), async (t) => {
      await both(t, { event, errno: 28, once, create: 'cluster_size=1024', size: '1G', commands: ['write -b 0 64k'], anyEnd: true, anyContent: true, leaksAllowed: true, writethrough: true });
    });
  }
}

// A write that needs more refcount blocks than the refcount table has room for: QEMU writes each new
// block and its table entry as it makes them, then a grown table and the header naming it; ours
// writes them at the write's flush. Each step failing fails the write (iotest 026's refcount table
// growth tests; reftable_grow, told as the table grows, fails whatever request comes next).
for (const event of ['refblock_alloc_write', 'refblock_alloc_hookup', 'reftable_grow', 'refblock_alloc_write_blocks', 'refblock_alloc_write_table', 'refblock_alloc_switch_table']) {
  test(`${event}: a write growing the refcount table fails, the image stays consistent`, needs('qemu-io', 'qemu-img'), async (t) => {
    await both(t, { event, errno: 28, once: 'on', create: 'cluster_size=512', size: '1G', commands: ['write 0 16M'], anyEnd: true, anyContent: true, leaksAllowed: true, writethrough: true });
  });
}
test('refblock_alloc_hookup once=off: the write and both flushes at close fail', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, { event: 'refblock_alloc_hookup', errno: 28, once: 'off', create: 'cluster_size=512', size: '1G', commands: ['write -b 0 16M'], anyEnd: true, anyContent: true, leaksAllowed: true, writethrough: true });
});

// A compressed write whose data write fails: QEMU has pointed the L2 entry at the bytes already and
// keeps it (the cluster then fails to read); ours changes the entry only after the write, so the
// range reads as before, and the room is given back (no leak) and used by the next compressed write.
test('write_compressed: the failed compressed write fails as in QEMU, and ours leaves no entry and no leak', needs('qemu-io', 'qemu-img'), async (t) => {
  const dir = await scratch(t);
  const conf = join(dir, 'blkdebug.conf');
  await writeFile(conf, '[inject-error]\nevent = "write_compressed"\nerrno = "5"\nonce = "on"\n');
  const outs = [];
  for (const [i, prog] of [COMPAT_QEMU_IO, 'qemu-io'].entries()) {
    const img = join(dir, `img${i}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    const r = await run(prog, ['-t', 'writeback', '-c', 'write -c -P 7 0 64k', '-c', 'write -c -P 8 64k 64k', `blkdebug:${conf}:${img}`]);
    const check = await run('qemu-img', ['check', img]);
    outs.push({ code: r.code, out: untimed(r.stdout), err: r.stderr, checkCode: check.code, leaks: /leaked/.test(check.stdout) });
  }
  assert.deepEqual(outs[0], outs[1]);
  assert.equal(outs[0]!.checkCode, 0);
  const ours = join(dir, 'img0.qcow2');
  const r = await run('qemu-io', ['-c', 'read -P 0 0 64k', '-c', 'read -P 8 64k 64k', ours]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.doesNotMatch(r.stdout, /Pattern verification failed|failed/);
  const end = (await run('qemu-img', ['check', '--output=json', ours])).stdout;
  // The second compressed cluster took the bytes the failed one was given: one host cluster in all.
  assert.equal(JSON.parse(end)['allocated-clusters'], 1);
});
