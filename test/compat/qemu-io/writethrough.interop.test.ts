/**
 * What each write request of qemu-io leaves on disk with the write cache off (-t writethrough,
 * -t directsync) and on (-t writeback), against qemu-io: one request, then `abort`, which drops
 * what was not flushed; without -t, qemu-io's write cache is off too. QEMU 7.2 flushes after a guest write (FUA: plain, vectored, aio, zeroes)
 * and after a VM state write (blk_save_vmstate) when the write cache is off, but not after a
 * compressed write (its path ignores FUA), so a compressed cluster's mapping stays in the cache
 * and is lost with it. The image each tool leaves is compared as qemu-img sees it: its map, the VM
 * state, and qemu-img check.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** The image after `cmd` and an abort under `cache`, as qemu-img and qemu-io see it. */
async function leftBehind(tool: string, dir: string, cache: string, cmd: string): Promise<string> {
  await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write 0 64k', '-c', 'write 128k 64k', 'a.qcow2'], dir);
  const r = await run(tool, ['-f', 'qcow2', ...(cache ? ['-t', cache] : []), '-c', cmd, '-c', 'abort', 'a.qcow2'], { cwd: dir });
  assert.notEqual(r.code, 0, `${tool} ${cmd}: abort`);
  const map = await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', 'a.qcow2'], { cwd: dir });
  const vmState = await run('qemu-io', ['-f', 'qcow2', '-c', 'read -b -P 0xcd 0 512', 'a.qcow2'], { cwd: dir });
  const check = await run('qemu-img', ['check', '-f', 'qcow2', 'a.qcow2'], { cwd: dir });
  return [map.stdout, vmState.stdout.split('\n')[0], check.stdout, check.stderr].join('\n');
}

test('a write request under -t writethrough is on disk when it completes, as qemu-io leaves it', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const cmds = ['write 64k 64k', 'writev 64k 4k 4k', 'aio_write 64k 64k', 'write -z 64k 64k', 'aio_write -z 64k 64k', 'write -b 0 512', 'write -c 64k 64k'];
  // '': no -t at all, which qemu-io takes as writethrough.
  for (const cache of ['writethrough', 'directsync', 'writeback', '']) {
    for (const cmd of cmds) {
      const want = await leftBehind('qemu-io', dir, cache, cmd);
      const got = await leftBehind(COMPAT_IO, dir, cache, cmd);
      assert.equal(got, want, `-t ${cache} ${cmd}`);
      // The cases the comparison is about, stated: the VM state survives when the cache is off; a
      // compressed cluster never does (QEMU does not flush after it).
      if (cmd === 'write -b 0 512') assert.equal(/^read 512\/512/m.test(want), cache !== 'writeback', `-t ${cache} ${cmd}`);
      if (cmd === 'write -c 64k 64k') assert.match(want, /"start": 65536, "length": 65536, "depth": 0, "present": false/, `-t ${cache} ${cmd}`);
    }
  }
});
