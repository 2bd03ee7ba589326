/**
 * qemu-img compare's verdicts, byte for byte, against QEMU's on the same pairs: the first
 * differing byte at the start, at the end, mid-cluster, on each side of the native loop's piece
 * and item boundaries, where one side reads zeros from a hole, sizes that differ with zeros or
 * data beyond; qcow2 against raw and qcow2 against qcow2;
 * with the host addon's compare loop (ops/native-compare.ts) and without it (QCOW_NO_NATIVE=1).
 * The message ("Content mismatch at offset N!") and the exit code must be QEMU's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, randomBytes, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const KiB = 1024;
const MiB = 1024 * KiB;

/** Ours with and without the addon, against qemu-img, on one command line. */
async function agree(dir: string, args: string[], what: string): Promise<string> {
  const want = await run('qemu-img', ['compare', ...args], { cwd: dir });
  assert.ok(want.code === 0 || want.code === 1, `${what}: qemu-img failed: ${want.stderr}`);
  for (const env of [{}, { QCOW_NO_NATIVE: '1' }]) {
    const got = await run(COMPAT_IMG, ['compare', ...args], { cwd: dir, env: { ...process.env, ...env } });
    assert.deepEqual([got.code, got.stdout, got.stderr], [want.code, want.stdout, ''], `${what} ${JSON.stringify(env)}`);
  }
  return want.stdout;
}

/** `data` as a raw file and, converted by qemu-img, a qcow2 one (holes and zeros unallocated). */
async function both(dir: string, name: string, data: Uint8Array): Promise<{ raw: string; qcow2: string }> {
  const raw = `${name}.raw`;
  await writeFile(join(dir, raw), data);
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, `${name}.qcow2`], dir);
  return { raw, qcow2: `${name}.qcow2` };
}

test('compare finds the first differing byte where qemu-img does, with and without the native loop', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  // 10 MiB and 1.5 KiB: the last cluster is short. 4-5 MiB is zeros: qemu-img leaves it
  // unallocated in the qcow2, so a difference there is data against a hole.
  const size = 10 * MiB + 1536;
  const base = randomBytes(size, 21);
  base.fill(0, 4 * MiB, 5 * MiB);
  const a = await both(dir, 'a', base);
  assert.match(await agree(dir, [a.qcow2, a.raw], 'identical'), /Images are identical/);
  // The native loop's pieces grow from 64 KiB (ends at 64 KiB, 128 KiB, ...) and its first items
  // end at 2 MiB and 6 MiB (compare.ts): both sides of those, the first and last bytes, the 4-5
  // MiB hole, mid-cluster.
  const places = [0, 511, 64 * KiB - 1, 64 * KiB, 128 * KiB + 3, 512 * KiB - 1, 512 * KiB, MiB, 2 * MiB - 1, 2 * MiB, 3 * MiB + 32 * KiB + 100, 4 * MiB + 777, 5 * MiB - 1, 6 * MiB - 1, 6 * MiB, 9 * MiB + 4095, size - 1];
  for (const [i, at] of places.entries()) {
    const changed = base.slice();
    changed[at] = changed[at]! ^ 0x5a || 1;
    const b = await both(dir, 'b', changed);
    const want = `Content mismatch at offset ${at - (at % 512)}!\n`;
    // qcow2 against raw and the other way round, qcow2 against qcow2, by turns.
    const pair = i % 3 === 0 ? [a.qcow2, b.raw] : i % 3 === 1 ? [b.raw, a.qcow2] : [a.qcow2, b.qcow2];
    assert.equal(await agree(dir, pair, `byte ${at}`), want);
  }
});

// At 64 MiB an item ends: the first block-status window ends there (chain-status.ts), and the
// items after the first few are up to 64 MiB (native-compare.ts ITEM).
test('compare across an item boundary at 64 MiB, as qemu-img', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const size = 66 * MiB;
  const base = randomBytes(size, 22);
  const a = await both(dir, 'a', base);
  for (const at of [64 * MiB - 1, 64 * MiB, 64 * MiB + 513]) {
    const changed = base.slice();
    changed[at] = changed[at]! ^ 1;
    await writeFile(join(dir, 'b.raw'), changed);
    assert.equal(await agree(dir, [a.qcow2, 'b.raw'], `byte ${at}`), `Content mismatch at offset ${at - (at % 512)}!\n`);
  }
});

test('compare of different sizes, zeros or data beyond the smaller image, strict or not, as qemu-img', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const base = randomBytes(3 * MiB, 23);
  const a = await both(dir, 'a', base);
  const longer = new Uint8Array(4 * MiB);
  longer.set(base);
  const zeros = await both(dir, 'zeros', longer);
  longer[3 * MiB + 300 * KiB + 5] = 9;
  const data = await both(dir, 'data', longer);
  for (const args of [[], ['-s']]) {
    for (const [x, y] of [
      [a.qcow2, zeros.raw],
      [zeros.qcow2, a.raw],
      [a.qcow2, data.qcow2],
      [data.raw, a.qcow2],
    ]) {
      await agree(dir, [...args, x!, y!], `${args.join(' ')} ${x} ${y}`);
    }
  }
  assert.equal(await agree(dir, [a.qcow2, data.raw], 'data beyond'), 'Warning: Image size mismatch!\nContent mismatch at offset 3452928!\n');
});
