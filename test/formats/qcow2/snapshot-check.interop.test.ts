/**
 * Damaged snapshot tables, made by hand from a qemu-made image, checked by qemu-img and by qcow:
 * `check` and `check -r all` must give the same JSON and exit code, qemu-img must judge our
 * repaired file as it judges its own, and the guest content must stay as it was.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, needs, qemuImg, qemuIo, run, scratch, sha256 } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const be = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);

interface Outcome {
  code: number;
  json: unknown;
  stderr: string;
}

async function check(dir: string, tool: 'qemu-img' | 'qcow' | 'compat', file: string, args: string[] = []): Promise<Outcome> {
  const argv = ['check', '-f', 'qcow2', ...args, file];
  const r =
    tool === 'qemu-img'
      ? await run('qemu-img', argv, { cwd: dir })
      : tool === 'qcow'
        ? await run(process.execPath, [CLI, ...argv], { cwd: dir })
        : await run(COMPAT_QEMU_IMG, argv, { cwd: dir });
  let json: unknown = null;
  if (args.includes('--output=json')) {
    try {
      json = JSON.parse(r.stdout);
      delete (json as Record<string, unknown>).filename;
    } catch {
      json = null;
    }
  }
  return { code: r.code, json, stderr: r.stderr };
}

async function guest(dir: string, file: string): Promise<string> {
  const r = await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, `${file}.raw`], { cwd: dir });
  return r.code === 0 ? sha256(await readFile(join(dir, `${file}.raw`))) : `unreadable: ${r.stderr}`;
}

/** Where the entries of the table named by the header start. */
function entryOffsets(b: Uint8Array): number[] {
  const v = be(b);
  const out: number[] = [];
  let pos = Number(v.getBigUint64(64));
  for (let i = 0; i < v.getUint32(60); i++) {
    out.push(pos);
    pos = Math.ceil((pos + 40 + v.getUint32(pos + 36) + v.getUint16(pos + 12) + v.getUint16(pos + 14)) / 8) * 8;
  }
  return out;
}

test('damaged snapshot tables: check and check -r all agree with qemu-img, and qemu-img finds our repair as good as its own', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'plain.qcow2', '1M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 64k', 'plain.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'snap.qcow2', '1M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 64k', 'snap.qcow2'], dir);
  await qemuImg(['snapshot', '-c', 's1', 'snap.qcow2'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 2 0 8k', 'snap.qcow2'], dir);
  await qemuImg(['snapshot', '-c', 's2', 'snap.qcow2'], dir);
  const plain = new Uint8Array(await readFile(join(dir, 'plain.qcow2')));
  const snap = new Uint8Array(await readFile(join(dir, 'snap.qcow2')));
  const [, e1] = entryOffsets(snap) as [number, number];
  const base = new Map<Uint8Array, string>([
    [plain, await guest(dir, 'plain.qcow2')],
    [snap, await guest(dir, 'snap.qcow2')],
  ]);
  const cases: Array<[string, () => Uint8Array]> = [
    // The header's own bytes read as entries: fields of every kind of wrong.
    ['a table at offset 0', () => withView(plain, (v) => v.setUint32(60, 2))],
    ['a table offset not aligned to a cluster', () => withView(snap, (v) => v.setBigUint64(64, v.getBigUint64(64) + 8n))],
    ['a count one past the table', () => withView(snap, (v) => v.setUint32(60, 3))],
    ['a count past the limit of 65536', () => withView(snap, (v) => v.setUint32(60, 70000))],
    ['an unaligned L1 offset past 2^53 in an entry', () => withView(snap, (v) => v.setBigUint64(e1, (1n << 60n) + 8n))],
    ['an aligned L1 offset past 2^53 in an entry', () => withView(snap, (v) => v.setBigUint64(e1, 1n << 60n))],
    ['an L1 offset in an entry past what a file can hold', () => withView(snap, (v) => v.setBigUint64(e1, 0x7fffffffc0000000n))],
    ['too much extra data in an entry', () => withView(snap, (v) => v.setUint32(e1 + 36, 2000))],
    ['extra data cut short in an entry', () => withView(snap, (v) => v.setUint32(e1 + 36, 8))],
    ['a file cut inside the table', () => snap.slice(0, e1 + 16)],
  ];
  for (const [what, make] of cases) {
    const img = make();
    await writeFile(join(dir, 'q.qcow2'), img);
    await writeFile(join(dir, 'c.qcow2'), img);
    const want = await guest(dir, 'c.qcow2');
    const a = await check(dir, 'qemu-img', 'q.qcow2', ['--output=json']);
    const b = await check(dir, 'qcow', 'c.qcow2', ['--output=json']);
    assert.deepEqual([b.code, b.json], [a.code, a.json], `${what}: check\nqemu-img: ${a.stderr.slice(0, 2000)}\nqcow: ${b.stderr.slice(0, 2000)}`);
    if (a.code === 1) {
      // The check cannot finish: qemu-img's lines, word for word, from the drop-in.
      const c = await check(dir, 'compat', 'c.qcow2');
      assert.equal(c.code, 1, what);
      assert.equal(c.stderr, a.stderr, what);
    }
    const ra = await check(dir, 'qemu-img', 'q.qcow2', ['-r', 'all', '--output=json']);
    const rb = await check(dir, 'qcow', 'c.qcow2', ['-r', 'all', '--output=json']);
    const qemuFailedRepair = /Preventing invalid write on metadata/.test(ra.stderr);
    if (!qemuFailedRepair) assert.deepEqual([rb.code, rb.json], [ra.code, ra.json], `${what}: -r all\nqemu-img: ${ra.stderr.slice(0, 2000)}\nqcow: ${rb.stderr.slice(0, 2000)}`);
    const after = await check(dir, 'qemu-img', 'c.qcow2', ['--output=json']);
    if (qemuFailedRepair) {
      // qemu-img's own overlap check stops its repair half way (the new table would go on the
      // clusters of the old one, which it had just freed); ours leaves a clean image.
      assert.equal(after.code, 0, `${what}: qemu-img check after our repair: ${after.stderr.slice(0, 2000)}`);
    } else {
      const afterQemu = await check(dir, 'qemu-img', 'q.qcow2', ['--output=json']);
      assert.deepEqual([after.code, after.json], [afterQemu.code, afterQemu.json], `${what}: qemu-img check of both repaired files`);
    }
    // Unchanged; or, where the damage made the image unreadable, as before the damage.
    const got = await guest(dir, 'c.qcow2');
    if (got !== want) assert.ok(want.startsWith('unreadable') && got === base.get(madeFrom.get(img) ?? snap), `${what}: guest content ${got}, was ${want}`);
  }
});

/** Images made from `plain` or `snap`, and which, for their guest content. */
const madeFrom = new Map<Uint8Array, Uint8Array>();

function withView(b: Uint8Array, edit: (v: DataView) => void): Uint8Array {
  const out = b.slice();
  madeFrom.set(out, b);
  edit(be(out));
  return out;
}
