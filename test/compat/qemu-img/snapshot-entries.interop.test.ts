/**
 * Snapshot table entries with less extra data than qemu writes (version 2 allows none), and
 * tables past qemu's limits: what the drop-in qemu-img writes and says must be what qemu-img
 * writes and says. An entry without a disk size reads as the image's size, one without an icount
 * as all ones; an upgrade to version 3 writes every entry in full; opening refuses the limits
 * with qemu's words.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

interface Entry {
  id: string;
  extra: number;
  diskSize?: bigint;
  icount?: bigint;
}

/** The entries of the table the header names: extra data size, disk size and icount when present. */
function entries(b: Uint8Array): Entry[] {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const out: Entry[] = [];
  let pos = Number(v.getBigUint64(64));
  for (let i = 0; i < v.getUint32(60); i++) {
    const idLen = v.getUint16(pos + 12);
    const extra = v.getUint32(pos + 36);
    const e: Entry = { id: new TextDecoder().decode(b.subarray(pos + 40 + extra, pos + 40 + extra + idLen)), extra };
    if (extra >= 16) e.diskSize = v.getBigUint64(pos + 48);
    if (extra >= 24) e.icount = v.getBigUint64(pos + 56);
    out.push(e);
    pos = Math.ceil((pos + 40 + extra + idLen + v.getUint16(pos + 14)) / 8) * 8;
  }
  return out;
}

/** A version 2 image whose first snapshot entry has no extra data (the rest of the table moved up). */
async function v2WithBareEntry(dir: string): Promise<void> {
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '1M'], dir);
  for (const n of ['s1', 's2']) await qemuImg(['snapshot', '-c', n, 'v2.qcow2'], dir);
  const b = new Uint8Array(await readFile(join(dir, 'v2.qcow2')));
  const v = new DataView(b.buffer);
  const at = Number(v.getBigUint64(64));
  const extra = v.getUint32(at + 36);
  const names = v.getUint16(at + 12) + v.getUint16(at + 14);
  const oldLen = Math.ceil((40 + extra + names) / 8) * 8;
  const newLen = Math.ceil((40 + names) / 8) * 8;
  const rest = b.slice(at + oldLen, at + 4096);
  b.copyWithin(at + 40, at + 40 + extra, at + 40 + extra + names);
  b.fill(0, at + 40 + names, at + newLen);
  v.setUint32(at + 36, 0);
  b.set(rest.subarray(0, 4096 - newLen), at + newLen);
  await writeFile(join(dir, 'v2.qcow2'), b);
}

test('snapshot entries without extra data: amend compat=1.1 and snapshot -d write them as qemu-img does', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await v2WithBareEntry(dir);
  for (const args of [
    ['amend', '-f', 'qcow2', '-o', 'compat=1.1'],
    ['snapshot', '-d', 's2'],
  ]) {
    await copyFile(join(dir, 'v2.qcow2'), join(dir, 'q.qcow2'));
    await copyFile(join(dir, 'v2.qcow2'), join(dir, 'c.qcow2'));
    await qemuImg([...args, 'q.qcow2'], dir);
    const r = await run(COMPAT, [...args, 'c.qcow2'], { cwd: dir });
    assert.equal(r.code, 0, r.stderr);
    const want = entries(new Uint8Array(await readFile(join(dir, 'q.qcow2'))));
    assert.equal(want[0]?.extra, 24, 'qemu-img writes the entry in full');
    assert.deepEqual(entries(new Uint8Array(await readFile(join(dir, 'c.qcow2')))), want, args.join(' '));
    const check = await run('qemu-img', ['check', 'c.qcow2'], { cwd: dir });
    assert.equal(check.code, 0, check.stdout + check.stderr);
  }
});

test("snapshot tables past qemu's limits: opening fails with qemu-img's words", needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '1M'], dir);
  await qemuImg(['snapshot', '-c', 's1', 'base.qcow2'], dir);
  const b = new Uint8Array(await readFile(join(dir, 'base.qcow2')));
  const v = new DataView(b.buffer);
  const at = Number(v.getBigUint64(64));
  const cases: Array<[string, (v: DataView) => void]> = [
    ['too much extra data', (d) => d.setUint32(at + 36, 0x10000)],
    ['too many snapshots', (d) => d.setUint32(60, 0x20000)],
  ];
  for (const [what, edit] of cases) {
    const img = b.slice();
    edit(new DataView(img.buffer));
    await writeFile(join(dir, 'x.qcow2'), img);
    const a = await run('qemu-img', ['info', 'x.qcow2'], { cwd: dir });
    const c = await run(COMPAT, ['info', 'x.qcow2'], { cwd: dir });
    assert.deepEqual([c.code, c.stderr], [a.code, a.stderr], what);
  }
});
