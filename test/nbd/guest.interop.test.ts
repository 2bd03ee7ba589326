/**
 * A real guest: QEMU's system emulator (TCG) boots Debian's kernel with its only disk served by
 * `qcow serve` over NBD (virtio-blk, discards passed through), on a qcow2 overlay over a qcow2
 * base. The guest's /init (busybox, see test-support/guest.ts) makes an ext2 filesystem, writes
 * files whose content the test knows, syncs, reads them back from the disk, deletes and trims,
 * and powers off; the image is then checked by qemu-img and read by both tools, and later boots
 * find the files intact. A second test SIGKILLs `qcow serve` while the guest writes and syncs
 * numbered files, and checks that every file the guest saw synced is there after a restart.
 *
 * Knobs: QCOW_CRASH_ROUNDS (kill rounds, default 3), QCOW_GUEST_OVERLAY_OPTIONS (`qcow create -o`
 * of the overlays, e.g. `extended_l2=on`), QCOW_GUEST_LOG=1 (print the crash rounds' consoles).
 * The kernel and its cache: test-support/guest.ts.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { bootGuest, buildInitrd, prepareKernel, type BootResult, type GuestKernel } from '../support/guest.js';
import { needs, qcowOk, qemuImg, randomBytes, run, runOk, scratch, sha256 } from '../support/qemu.js';
import { serveQcow, type Served } from '../support/serve.js';

/** A boot that hangs fails after this long (a TCG boot and its work take seconds here). */
const BOOT_TIMEOUT_MS = 150_000;
// The guest runs the host's static busybox, unless QCOW_GUEST_BUSYBOX names another.
const TOOLS = needs('qemu-system-x86_64', 'qemu-img', ...(process.env.QCOW_GUEST_BUSYBOX ? [] : ['busybox']));
/** e2fsck lives in /usr/sbin, which is not on every user's PATH. */
const sbin = (tool: string) => [`/usr/sbin/${tool}`, `/sbin/${tool}`].find((p) => existsSync(p)) ?? tool;
const E2FSCK = sbin('e2fsck');
const MKE2FS = sbin('mke2fs');
/** Kill-and-restart rounds of the crash test (each one boot, seconds). */
const CRASH_ROUNDS = Number(process.env.QCOW_CRASH_ROUNDS ?? 3);
/** Creation options of the overlays (qcow create -o), to try others: extended_l2=on, ... */
const OVERLAY_OPTIONS = process.env.QCOW_GUEST_OVERLAY_OPTIONS;

/** Resolves with `value` after `ms`, without keeping the process alive. */
const after = <T>(ms: number, value: T) => new Promise<T>((r) => setTimeout(() => r(value), ms).unref());

let kernelPromise: Promise<GuestKernel> | undefined;
const kernel = () => (kernelPromise ??= prepareKernel());

/** `qcow serve` of a qcow2 image; it may start slowly beside a busy emulator. */
const serve = (t: TestContext, dir: string, image: string): Promise<Served> => serveQcow(t, dir, ['-f', 'qcow2', image], { waitMs: 30_000 });

/**
 * Serve `image`, boot the guest on it with `script` (run by `sh -e`) and `files`, and wait for
 * both to end. The guest must finish its script (GUEST-EXIT 0) and `qcow serve` must exit 0
 * after QEMU disconnects (having flushed and closed the image).
 */
async function bootOn(t: TestContext, dir: string, image: string, script: string, files: Record<string, Uint8Array> = {}): Promise<BootResult> {
  const k = await kernel();
  const initrd = join(dir, `initrd-${Math.random().toString(36).slice(2)}.gz`);
  await writeFile(initrd, await buildInitrd(k, script, files));
  const served = await serve(t, dir, image);
  const boot = bootGuest({ kernel: k, initrd, socket: served.sock, timeoutMs: BOOT_TIMEOUT_MS });
  const r = await boot.done;
  assert.ok(r.lines.includes('GUEST-EXIT 0'), `guest script failed (QEMU exit ${r.exit}); console:\n${r.log.slice(-6000)}\nqcow serve: ${served.stderr()}`);
  const code = await Promise.race([served.exited, after(30_000, 'still running 30 s after QEMU ended')]);
  assert.equal(code, 0, `qcow serve: ${served.stderr()}`);
  return r;
}

/** `TAG <sha256> <name>` lines (from `sha256sum | sed 's/^/TAG /'`) as name -> hash. */
function shas(lines: string[], tag: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const l of lines) {
    const m = new RegExp(`^${tag} ([0-9a-f]{64})\\s+(\\S+)$`).exec(l);
    if (m) out.set(m[2]!, m[1]!);
  }
  return out;
}

/**
 * The image as both tools see it: `qemu-img check` finds no errors (`allowLeaks`: leaked
 * clusters are fine, as after a crash), `qcow convert -O raw` and `qemu-img convert -O raw` give
 * the same bytes, and e2fsck finds the filesystem in them clean (`fsck`). Returns the raw content.
 */
async function checkImage(dir: string, image: string, options: { allowLeaks?: boolean; fsck?: boolean } = {}): Promise<Buffer> {
  const check = await run('qemu-img', ['check', '--output=json', '-f', 'qcow2', image]);
  const ok = check.code === 0 || (options.allowLeaks && check.code === 3);
  assert.ok(ok, `qemu-img check exited ${check.code}:\n${check.stdout}${check.stderr}`);
  const report = JSON.parse(check.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
  assert.equal(report.corruptions ?? 0, 0, check.stdout);
  assert.equal(report['check-errors'] ?? 0, 0, check.stdout);
  if (!options.allowLeaks) assert.equal(report.leaks ?? 0, 0, check.stdout);
  const ours = join(dir, 'ours.raw');
  const theirs = join(dir, 'theirs.raw');
  await qcowOk(['convert', '-f', 'qcow2', '-O', 'raw', image, ours]);
  await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', image, theirs]);
  const [a, b] = await Promise.all([readFile(ours), readFile(theirs)]);
  assert.equal(a.length, b.length);
  assert.ok(a.equals(b), 'qcow and qemu-img read different guest content');
  if (options.fsck) {
    const fsck = await run(E2FSCK, ['-f', '-n', theirs]);
    assert.equal(fsck.code, 0, `e2fsck -fn on the guest disk:\n${fsck.stdout}${fsck.stderr}`);
  }
  return b;
}

/** How many 4 KiB blocks hold data in `before` and only zeros in `after`. */
function zeroedBlocks(before: Buffer, after: Buffer): number {
  const zero = Buffer.alloc(4096);
  let n = 0;
  for (let off = 0; off + 4096 <= before.length; off += 4096) {
    if (!before.subarray(off, off + 4096).equals(zero) && after.subarray(off, off + 4096).equals(zero)) n++;
  }
  return n;
}

/** Unmount, drop the guest's caches and mount again, so what follows reads the disk. */
const REMOUNT = `cd /
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount /dev/vda /mnt
`;

test('a Linux guest makes a filesystem, writes, trims and reboots on an overlay served by qcow serve', { ...TOOLS, timeout: 600_000 }, async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '128M']);

  // Known content: two files for the base, two for the overlay, and a patch written into the
  // middle of a base file from the overlay (40000 bytes at 280000: a partial-cluster COW).
  const p1 = randomBytes(1536 * 1024 + 1234, 1);
  const p2 = randomBytes(2 * 1024 * 1024, 2);
  const p3 = randomBytes(3 * 1024 * 1024 + 77, 3);
  const p4 = new TextEncoder().encode('qcow serve booted a guest\n'.repeat(100));
  const patch = randomBytes(40000, 5);
  const p1patched = new Uint8Array(p1);
  p1patched.set(patch, 7 * 40000);

  // Boot 1, on the base: make the filesystem and the base files.
  const r1 = await bootOn(
    t,
    dir,
    base,
    `mke2fs -q -b 4096 /dev/vda
mount /dev/vda /mnt
mkdir /mnt/base
cp /payload/p1 /payload/p2 /mnt/base/
sync
${REMOUNT}
cd /mnt/base && sha256sum p1 p2 | sed 's/^/SHA /' && cd /
umount /mnt
`,
    { '/payload/p1': p1, '/payload/p2': p2 },
  );
  assert.deepEqual(Object.fromEntries(shas(r1.lines, 'SHA')), { p1: sha256(p1), p2: sha256(p2) });
  const baseRaw = await checkImage(dir, base, { fsck: true });

  // Boot 2, on an overlay with smaller clusters than the base: read the base files through it,
  // add files, patch a base file, delete the other, trim, read everything back from the disk.
  await qcowOk(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', '-o', OVERLAY_OPTIONS ?? 'cluster_size=16384', top]);
  const r2 = await bootOn(
    t,
    dir,
    top,
    `mount /dev/vda /mnt
cd /mnt/base && sha256sum p1 p2 | sed 's/^/BASE /' && cd /
mkdir /mnt/top
cp /payload/p3 /payload/p4 /mnt/top/
dd if=/payload/patch of=/mnt/base/p1 bs=40000 count=1 seek=7 conv=notrunc 2>/dev/null
rm /mnt/base/p2
sync
echo "TRIM $(fstrim -v /mnt)"
sync
${REMOUNT}
cd /mnt && sha256sum base/p1 top/p3 top/p4 | sed 's/^/SHA /' && cd /
echo "LS $(ls /mnt/base | tr '\\n' ' ')"
umount /mnt
`,
    { '/payload/p3': p3, '/payload/p4': p4, '/payload/patch': patch },
  );
  assert.deepEqual(Object.fromEntries(shas(r2.lines, 'BASE')), { p1: sha256(p1), p2: sha256(p2) });
  const expected = { 'base/p1': sha256(p1patched), 'top/p3': sha256(p3), 'top/p4': sha256(p4) };
  assert.deepEqual(Object.fromEntries(shas(r2.lines, 'SHA')), expected);
  assert.ok(r2.lines.includes('LS p1 '), r2.lines.filter((l) => l.startsWith('LS')).join('\n'));
  const trimmed = /^TRIM \/mnt: (\d+) bytes trimmed/m.exec(r2.lines.join('\n'));
  assert.ok(trimmed && Number(trimmed[1]) > 0, `fstrim trimmed nothing: ${r2.lines.filter((l) => l.startsWith('TRIM')).join('\n')}`);
  t.diagnostic(`fstrim: ${trimmed[1]} bytes trimmed`);
  const topRaw = await checkImage(dir, top, { fsck: true });
  // The base was only read.
  assert.ok((await checkImage(dir, base)).equals(baseRaw), 'the base changed under the overlay');
  // The trim reached the image: blocks that held data in the base (the deleted p2 among them)
  // now read as zeros through the overlay.
  const zeroed = zeroedBlocks(baseRaw, topRaw);
  t.diagnostic(`4 KiB blocks with data in the base that read as zeros through the trimmed overlay: ${zeroed}`);
  // (With other overlay layouts, large clusters may leave partial-cluster discards undone, as
  // QEMU does.)
  if (!OVERLAY_OPTIONS) assert.ok(zeroed >= p2.length / 4096 / 2, `only ${zeroed} blocks of the base were trimmed away in the overlay`);

  // Boot 3, on the same overlay: everything is still there, and nothing changed the image.
  const r3 = await bootOn(
    t,
    dir,
    top,
    `mount -o ro /dev/vda /mnt
cd /mnt && sha256sum base/p1 top/p3 top/p4 | sed 's/^/SHA /' && cd /
[ ! -e /mnt/base/p2 ]
umount /mnt
`,
  );
  assert.deepEqual(Object.fromEntries(shas(r3.lines, 'SHA')), expected);
  assert.ok((await checkImage(dir, top, { fsck: true })).equals(topRaw), 'a read-only mount changed the disk');
});

test('qcow serve SIGKILLed while a guest writes: the image is consistent and every synced file survives', { ...TOOLS, timeout: 600_000 }, async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  // A journalled ext4 (made here: busybox makes only ext2), so that what the guest fsyncs is
  // whole after a crash as far as the filesystem goes; what is left to fail is the disk.
  const raw = join(dir, 'base.raw');
  await runOk(MKE2FS, ['-q', '-F', '-t', 'ext4', '-b', '4096', raw, '64M']);
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, base]);
  await qcowOk(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', ...(OVERLAY_OPTIONS ? ['-o', OVERLAY_OPTIONS] : []), top]);
  const k = await kernel();

  // Each round boots on the image the last one left. The guest first prints every numbered
  // file it finds ("HAVE path sha256"), then writes new ones: most of 32 KiB to 224 KiB of
  // random data, every third one preallocated and written in its middle (ext4 zeroes the rest of
  // a small unwritten extent: WRITE_ZEROES). After each it syncs the file and its folder (busybox
  // `sync FILE` is fsync and fails on an I/O error) and only then prints "SYNCED path sha256";
  // every fourth it deletes an older one ("DROPPING path", then rm) and trims. The server is
  // SIGKILLed a random moment after a chosen SYNCED line, QEMU after it. The last boot only looks.
  const synced = new Map<string, string>();
  const listFiles = `for f in $(ls -d /mnt/r*/f* 2>/dev/null); do echo "HAVE $f $(sha256sum < $f | cut -d' ' -f1)"; done`;
  const checkSynced = (lines: string[], round: number) => {
    const have = new Map<string, string>();
    for (const l of lines) {
      const m = /^HAVE (\S+) ([0-9a-f]{64})$/.exec(l);
      if (m) have.set(m[1]!, m[2]!);
    }
    for (const [path, h] of synced) {
      assert.equal(have.get(path), h, `round ${round}: ${path}, synced before a kill, is ${have.has(path) ? 'changed' : 'missing'}`);
    }
  };
  for (let round = 1; round <= CRASH_ROUNDS; round++) {
    const script = `mount /dev/vda /mnt
${listFiles}
d=/mnt/r${round}
mkdir $d
sync /mnt
i=1
while [ $i -le 500 ]; do
  f=$d/f$i
  if [ $((i % 3)) = 0 ]; then
    fallocate -l 32768 $f
    dd if=/dev/urandom of=$f bs=4096 count=1 seek=3 conv=notrunc 2>/dev/null
  else
    dd if=/dev/urandom of=$f bs=32768 count=$((i % 7 + 1)) 2>/dev/null
  fi
  h=$(sha256sum < $f | cut -d' ' -f1)
  sync $f $d
  echo "SYNCED $f $h"
  if [ $((i % 4)) = 0 ]; then
    echo "DROPPING $d/f$((i - 2))"
    rm $d/f$((i - 2))
    fstrim /mnt
  fi
  i=$((i + 1))
done
`;
    const initrd = join(dir, `initrd-${round}.gz`);
    await writeFile(initrd, await buildInitrd(k, script));
    const served = await serve(t, dir, top);
    const killAt = 2 + Math.floor(Math.random() * 8);
    const delayMs = Math.floor(Math.random() * 300);
    let killed = false;
    const boot = bootGuest({
      kernel: k,
      initrd,
      socket: served.sock,
      timeoutMs: BOOT_TIMEOUT_MS,
      onLine: (line) => {
        if (killed || !line.startsWith(`SYNCED /mnt/r${round}/f${killAt} `)) return;
        killed = true;
        setTimeout(() => {
          served.child.kill('SIGKILL');
          // Leave the guest a moment to report what it saw, then stop it.
          void served.exited.then(() => setTimeout(() => boot.kill(), 500));
        }, delayMs);
      },
    });
    const t0 = Date.now();
    const r = await boot.done;
    if (process.env.QCOW_GUEST_LOG) t.diagnostic(`round ${round} console (${Date.now() - t0} ms):\n${r.log}`);
    const serveEnd = await Promise.race([served.exited, after(30_000, 'still running')]);
    assert.equal(serveEnd, 'SIGKILL', `round ${round}: the guest ended before the kill (QEMU exit ${r.exit}); console:\n${r.log.slice(-6000)}`);
    checkSynced(r.lines, round);
    let now = 0;
    for (const l of r.lines) {
      const m = /^SYNCED (\S+) ([0-9a-f]{64})$/.exec(l);
      if (m) {
        synced.set(m[1]!, m[2]!);
        now++;
      }
      const drop = /^DROPPING (\S+)$/.exec(l);
      if (drop) synced.delete(drop[1]!);
    }
    assert.ok(now >= killAt, `round ${round}: only ${now} files synced; console:\n${r.log.slice(-6000)}`);
    const errors = r.lines.filter((l) => /error/i.test(l)).length;
    t.diagnostic(`round ${round}: killed qcow serve ${delayMs} ms after file ${killAt} synced; the guest saw ${now} synced, then ${errors} error lines`);
    // The image after the crash: no corruption (leaks allowed), both tools read the same content.
    await checkImage(dir, top, { allowLeaks: true });
  }

  // A last boot on a restarted server finds every file synced in any round.
  const r = await bootOn(t, dir, top, `mount /dev/vda /mnt\n${listFiles}\numount /mnt\n`);
  checkSynced(r.lines, CRASH_ROUNDS + 1);
  await checkImage(dir, top, { allowLeaks: true });
});
