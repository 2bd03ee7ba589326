/**
 * Lazy refcounts through the drop-in qemu-io, against qemu-io: with the write cache off
 * (-t writethrough) each write reaches the disk, but its refcount stays in memory until a clean
 * close, so a process killed after a write leaves the image dirty with the data cluster uncounted;
 * the next writable open repairs it and prints the repair's messages; `reopen -o lazy-refcounts`
 * turns them on or off for the open. The images (qemu-img check) and messages match qemu-io's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** qemu-io's stderr (timing lines are on stdout) and the check of the image afterwards. */
async function after(tool: string, dir: string, args: string[]): Promise<{ stderr: string; check: string; dirty: boolean }> {
  const r = await run(tool, ['-f', 'qcow2', '-t', 'writethrough', ...args, 'a.qcow2'], { cwd: dir });
  const info = await run('qemu-img', ['info', '--output=json', 'a.qcow2'], { cwd: dir });
  const check = await run('qemu-img', ['check', 'a.qcow2'], { cwd: dir });
  const dirty = (JSON.parse(info.stdout) as { 'dirty-flag'?: boolean })['dirty-flag'] === true;
  return { stderr: r.stderr.replace(/^.*Killed.*\n/m, ''), check: check.stdout + check.stderr, dirty };
}

test('a write then a kill leaves what qemu-io leaves, with lazy refcounts on or off', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const cases: Array<[string, string, string[]]> = [
    ['lazy refcounts', 'lazy_refcounts=on', ['-c', 'write -P 0x5a 0 512', '-c', 'sigraise 9']],
    ['lazy refcounts off', 'lazy_refcounts=off', ['-c', 'write -P 0x5a 0 512', '-c', 'sigraise 9']],
    ['turned on by reopen', 'lazy_refcounts=off', ['-c', 'reopen -o lazy-refcounts=on', '-c', 'write -P 0x5a 0 512', '-c', 'sigraise 9']],
    ['turned off by reopen', 'lazy_refcounts=on', ['-c', 'reopen -o lazy-refcounts=off', '-c', 'write -P 0x5a 0 512', '-c', 'sigraise 9']],
    ['closed cleanly', 'lazy_refcounts=on', ['-c', 'write -P 0x5a 0 512']],
  ];
  for (const [what, opts, args] of cases) {
    const got: unknown[] = [];
    for (const tool of ['qemu-io', COMPAT_IO]) {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `compat=1.1,${opts}`, 'a.qcow2', '128M'], dir);
      const killed = await after(tool, dir, args);
      // The next writable open repairs a dirty image and says so on stderr; the data is there.
      const reopened = await after(tool, dir, ['-c', 'read -P 0x5a 0 512', '-c', 'write 64k 512']);
      got.push({ killed, reopened });
    }
    assert.deepEqual(got[1], got[0], what);
  }
});
