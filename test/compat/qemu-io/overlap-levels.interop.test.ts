/**
 * qcow2's `overlap-check` option through the drop-in qemu-io, against qemu-io: the level and the
 * per-structure switches reach the library; at level "all" (or `overlap-check.inactive-l2=on`) a
 * write onto a snapshot's L2 table is refused as a corruption; and a snapshot L1 table QEMU's
 * validation refuses fails every write with its errno (EINVAL, EFBIG), without marking the image,
 * with qcow2's message at close for the refcounts it could not write back (iotest 080), and for
 * the L2 tables and counts a discard or a zero write changed and could not write back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { needsHoles } from '../../support/addon.js';
import { firstL2Offset, headerOf } from '../../support/qcow2-edit.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** What a run printed (timing lines dropped), whether the image was marked corrupt, and its check. */
async function outcome(tool: string, dir: string, cmds: string[]): Promise<{ stdout: string; stderr: string; corrupt: boolean; check: string }> {
  const r = await run(tool, cmds.flatMap((c) => ['-c', c]), { cwd: dir });
  const info = await run('qemu-img', ['info', '--output=json', 'a.qcow2'], { cwd: dir });
  const spec = JSON.parse(info.stdout) as { 'format-specific'?: { data?: { corrupt?: boolean } } };
  const check = await run('qemu-img', ['check', 'a.qcow2'], { cwd: dir });
  return {
    stdout: r.stdout.replace(/^\d.*ops\/sec\)\n/gm, ''),
    stderr: r.stderr,
    corrupt: spec['format-specific']?.data?.corrupt === true,
    check: check.stdout + check.stderr,
  };
}

/** Overwrite the big-endian field of `bytes` bytes at `pos` of the first snapshot table entry. */
async function pokeSnapshot(file: string, pos: number, value: bigint, bytes: 4 | 8): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const { header } = await headerOf(fh);
    const b = new Uint8Array(bytes);
    const v = new DataView(b.buffer);
    if (bytes === 8) v.setBigUint64(0, value);
    else v.setUint32(0, Number(value));
    await fh.write(b, 0, bytes, header.snapshotsOffset + pos);
  } finally {
    await fh.close();
  }
}

test('a snapshot L1 table the validation refuses fails writes when inactive L2 tables are checked', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  // [what, snapshot entry field, its width, value, commands]
  const cases: Array<[string, number, 4 | 8, bigint, string[]]> = [
    ['L1 offset not aligned, shared cluster', 0, 8, 0x400200n, ['write 0 4k']],
    ['L1 table too large, shared cluster', 8, 4, 0x10000000n, ['write 0 4k']],
    ['L1 offset not aligned, new cluster', 0, 8, 0x400200n, ['write 1M 4k']],
    ['L1 offset not aligned, in place', 0, 8, 0x400200n, ['write 128k 4k']],
    ['L1 offset not aligned, level all', 0, 8, 0x400200n, ['write 0 4k']],
    ['L1 offset not aligned, default level', 0, 8, 0x400200n, ['write 1M 4k']],
  ];
  for (const [what, pos, width, value, cmds] of cases) {
    const opts = what.endsWith('level all') ? 'overlap-check=all' : what.endsWith('default level') ? 'overlap-check=cached' : 'overlap-check.inactive-l2=on';
    const got: unknown[] = [];
    const bytes: Buffer[] = [];
    // One image for both tools: the snapshot's date is part of it.
    await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
    await qemuIo(['-f', 'qcow2', '-c', 'write 0 512', 'base.qcow2'], dir);
    await qemuImg(['snapshot', '-c', 'test', 'base.qcow2'], dir);
    // A cluster of the active image only: written in place by 'write 128k 4k'.
    await qemuIo(['-f', 'qcow2', '-c', 'write 128k 4k', 'base.qcow2'], dir);
    await pokeSnapshot(join(dir, 'base.qcow2'), pos, value, width);
    for (const tool of ['qemu-io', COMPAT_IO]) {
      await copyFile(join(dir, 'base.qcow2'), join(dir, 'a.qcow2'));
      got.push(await outcome(tool, dir, [`open -o ${opts} a.qcow2`, ...cmds]));
      bytes.push(await readFile(join(dir, 'a.qcow2')));
    }
    assert.deepEqual(got[1], got[0], what);
    assert.ok(bytes[0]!.equals(bytes[1]!), `${what}: the images are the same byte for byte`);
  }
});

test('a discard or a zero write under a refused inactive L2 check: its tables and counts fail to flush, as in qemu-io', { ...needs('qemu-img', 'qemu-io'), ...needsHoles() }, async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write 0 512', '-c', 'write 64k 64k', 'base.qcow2'], dir);
  await qemuImg(['snapshot', '-c', 'test', 'base.qcow2'], dir);
  // 256k: a cluster of the active image only (a discard gives it back); 0: one the snapshot shares.
  await qemuIo(['-f', 'qcow2', '-c', 'write 128k 4k', '-c', 'write 256k 64k', 'base.qcow2'], dir);
  await pokeSnapshot(join(dir, 'base.qcow2'), 0, 0x400200n, 8);
  const cmds = ['discard 256k 64k', 'write -z 256k 64k', 'write -z -u 256k 64k', 'discard 0 64k', 'write -z 0 64k', 'write -z -u 0 64k'];
  // `open` is writethrough unless told (each zero write then flushes and fails); with writeback
  // only the close fails.
  for (const cache of ['', '-t writeback ']) {
    for (const cmd of cmds) {
      const got: unknown[] = [];
      const bytes: Buffer[] = [];
      for (const tool of ['qemu-io', COMPAT_IO]) {
        await copyFile(join(dir, 'base.qcow2'), join(dir, 'a.qcow2'));
        got.push(await outcome(tool, dir, [`open ${cache}-o overlap-check.inactive-l2=on a.qcow2`, cmd]));
        bytes.push(await readFile(join(dir, 'a.qcow2')));
      }
      assert.deepEqual(got[1], got[0], `${cache}${cmd}`);
      assert.ok(bytes[0]!.equals(bytes[1]!), `${cache}${cmd}: the images are the same byte for byte`);
      assert.match((got[0] as { stderr: string }).stderr, /Failed to flush the L2 table cache: Invalid argument/, `${cache}${cmd}`);
    }
  }
});

test('a write onto a snapshot L2 table is refused at level all and made at the default level', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const opts of ['overlap-check=all', 'overlap-check.inactive-l2=on', 'overlap-check=cached', 'overlap-check=all,overlap-check.inactive-l2=off']) {
    const got: unknown[] = [];
    const bytes: Buffer[] = [];
    // One image for both tools: the snapshot's date is part of it.
    await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
    await qemuIo(['-f', 'qcow2', '-c', 'write 0 512', 'base.qcow2'], dir);
    const base = join(dir, 'base.qcow2');
    let fh = await open(base, 'r+');
    const oldL2 = await firstL2Offset(fh);
    await fh.close();
    await qemuImg(['snapshot', '-c', 'test', 'base.qcow2'], dir);
    // The active image gets its own L2 table; the old one is the snapshot's only.
    await qemuIo(['-f', 'qcow2', '-c', 'write 0 512', 'base.qcow2'], dir);
    fh = await open(base, 'r+');
    const l2 = await firstL2Offset(fh);
    assert.notEqual(l2, oldL2);
    // Guest cluster 1 (COPIED) points at the snapshot's L2 table: a write there is in place.
    const entry = new Uint8Array(8);
    new DataView(entry.buffer).setBigUint64(0, (1n << 63n) | BigInt(oldL2));
    await fh.write(entry, 0, 8, l2 + 8);
    await fh.close();
    const file = join(dir, 'a.qcow2');
    for (const tool of ['qemu-io', COMPAT_IO]) {
      await copyFile(base, file);
      got.push(await outcome(tool, dir, [`open -o ${opts} a.qcow2`, 'write -P 0x33 64k 512']));
      bytes.push(await readFile(file));
    }
    assert.deepEqual(got[1], got[0], opts);
    assert.ok(bytes[0]!.equals(bytes[1]!), `${opts}: the images are the same byte for byte`);
  }
});

test('overlap-check=none lets a write onto the active L1 table through, as qemu-io does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const opts of ['overlap-check=none', 'overlap-check=constant', 'overlap-check=cached,overlap-check.active-l1=off']) {
    const got: unknown[] = [];
    const bytes: Buffer[] = [];
    for (const tool of ['qemu-io', COMPAT_IO]) {
      await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '64M'], dir);
      await qemuIo(['-f', 'qcow2', '-c', 'write 0 512', 'a.qcow2'], dir);
      const file = join(dir, 'a.qcow2');
      const fh = await open(file, 'r+');
      const { header } = await headerOf(fh);
      const l2 = await firstL2Offset(fh);
      // Guest cluster 1 points at the active L1 table (iotest 060's first case).
      const entry = new Uint8Array(8);
      new DataView(entry.buffer).setBigUint64(0, (1n << 63n) | BigInt(header.l1TableOffset));
      await fh.write(entry, 0, 8, l2 + 8);
      await fh.close();
      got.push(await outcome(tool, dir, [`open -o ${opts} a.qcow2`, 'write -P 0 64k 512']));
      bytes.push(await readFile(file));
    }
    assert.deepEqual(got[1], got[0], opts);
    assert.ok(bytes[0]!.equals(bytes[1]!), `${opts}: the images are the same byte for byte`);
  }
});
