/**
 * Crash safety with persistent bitmaps: a writer recording its writes in an enabled bitmap is
 * SIGKILLed at random moments. Each time `qemu-img check` must find no corruption (leaks are
 * allowed), the bitmap must be flagged in use (inconsistent, as after a QEMU crash), and QEMU
 * must still be able to remove it; a fresh bitmap is then added for the next round.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { needs, qcowOk, qemuImg, run, scratch } from '../../support/qemu.js';
import { crashRound } from '../../support/crash.js';

const ROUNDS = Number(process.env.QCOW_CRASH_ROUNDS ?? 6);

test(`a writer killed while recording writes in a bitmap leaves an in-use bitmap and no corruption (${ROUNDS} rounds)`, needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'crash.qcow2');
  await qcowOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', file, String(16 * 2 ** 20)]);
  let writes = 0;
  for (let round = 0; round < ROUNDS; round++) {
    await qemuImg(['bitmap', '--add', '-g', '512', file, 'b']);
    const lines = await crashRound(file, 'qcow2', round + 1, { afterLines: 20 + ((round * 337) % 80), thenMs: (round * 7) % 30 }, { cacheBytes: 16 * 1024, flushOneIn: 16 });
    writes += lines.length;
    const check = await run('qemu-img', ['check', '--output=json', file]);
    assert.ok(check.code === 0 || check.code === 3, `round ${round}: qemu-img check exit ${check.code}\n${check.stdout}${check.stderr}`);
    assert.equal(JSON.parse(check.stdout).corruptions ?? 0, 0);
    const info = JSON.parse((await qemuImg(['info', '--output=json', file])).stdout);
    assert.deepEqual(info['format-specific'].data.bitmaps[0].flags, ['in-use', 'auto'], `round ${round}`);
    await qemuImg(['bitmap', '--remove', file, 'b']);
    const after = await run('qemu-img', ['check', '--output=json', file]);
    assert.equal(JSON.parse(after.stdout).corruptions ?? 0, 0);
  }
  t.diagnostic(`${writes} writes announced`);
});
