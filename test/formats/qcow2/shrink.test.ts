/**
 * qcow resize --shrink on qcow2, as qemu-img resize --shrink: refused without --shrink; with it the
 * clusters past the end are dropped, the file gets shorter, qemu-img check stays clean, the kept
 * range and internal snapshots read as before.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qcow, qcowOk, qemuGuestSha256, qemuImg, qemuIo, run, scratch, sha256 } from '../../support/qemu.js';

test('shrinking needs --shrink, drops what lies past the end and cuts the file', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const [opts, cs] of [['cluster_size=4k', '4k'], ['cluster_size=64k,compat=0.10', '64k'], ['cluster_size=16k,extended_l2=on', '16k']] as const) {
    const f = join(dir, 's.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, f, '8M']);
    await qemuIo(['-c', `write -c -P 2 7M ${cs}`, '-c', 'write -P 1 0 7M', f]);
    const refused = await qcow(['resize', f, '1000k']);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /Use the --shrink option/);
    const big = (await stat(f)).size;
    await qcowOk(['resize', '--shrink', f, '1000k']);
    const c = await run('qemu-img', ['check', f]);
    assert.equal(c.code, 0, opts + c.stdout + c.stderr);
    const info = JSON.parse((await qemuImg(['info', '--output=json', f])).stdout) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], 1000 * 1024);
    assert.equal(await qemuGuestSha256(['-f', 'qcow2', f]), sha256(new Uint8Array(1000 * 1024).fill(1)), opts);
    assert.ok((await stat(f)).size < big / 4, `${opts}: file not cut (${(await stat(f)).size} of ${big})`);
    // Growing again shows zeros from the first cluster past the end on. The tail of the last
    // kept cluster still holds its old bytes: qemu 7.2 behaves the same (checked with qemu-io).
    await qcowOk(['resize', f, '2M']);
    const raw = join(dir, 'g.raw');
    await qemuImg(['convert', '-O', 'raw', f, raw]);
    const g = await readFile(raw);
    const firstGone = Math.ceil((1000 * 1024) / (Number.parseInt(cs, 10) * 1024)) * Number.parseInt(cs, 10) * 1024;
    assert.ok(g.subarray(firstGone).every((b) => b === 0), opts);
    assert.equal((await run('qemu-img', ['check', f])).code, 0);
  }
});

test('shrinking keeps internal snapshots readable and the image clean', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const f = join(dir, 's.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', f, '8M']);
  await qemuIo(['-c', 'write -P 1 0 8M', f]);
  await qemuImg(['snapshot', '-c', 'a', f]);
  await qemuIo(['-c', 'write -P 2 0 3M', f]);
  const snap = await qemuGuestSha256(['-f', 'qcow2', '-l', 'a', f]);
  await qcowOk(['resize', '--shrink', f, '2M']);
  const c = await run('qemu-img', ['check', f]);
  assert.equal(c.code, 0, c.stdout + c.stderr);
  assert.equal(await qemuGuestSha256(['-f', 'qcow2', f]), sha256(new Uint8Array(2 * 1024 * 1024).fill(2)));
  // Applying the snapshot brings back its 8 MiB, every byte as it was.
  await qcowOk(['snapshot', '-a', 'a', f]);
  assert.equal((await run('qemu-img', ['check', f])).code, 0);
  assert.equal(await qemuGuestSha256(['-f', 'qcow2', f]), snap);
});

test('growing over a longer backing image reads zeros in the new range, not the backing bytes (as qemu)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'b.qcow2');
  const top = join(dir, 't.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
  await qemuIo(['-c', 'write -P 0x11 0 1M', base]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '1M']);
  await qemuIo(['-c', 'write -P 0x22 0 1M', top]);
  await qcowOk(['resize', '--shrink', top, '520k']);
  await qcowOk(['resize', top, '567k']);
  await qemuIo(['-c', 'read -P 0x22 0 520k', '-c', 'read -P 0 520k 47k', top]);
  assert.equal((await run('qemu-img', ['check', top])).code, 0);
});
