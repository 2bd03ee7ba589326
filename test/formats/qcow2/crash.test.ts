/**
 * Crash safety: a child process writes random data at random offsets (test-support/crash-writer.node.ts) and is
 * killed with SIGKILL at a random moment, QCOW_CRASH_ROUNDS times (default 8) on the same image.
 * After every kill, `qemu-img check` must find no corruption (leaks are allowed), and every byte
 * that no write after the last completed flush touched must read back as it was written.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { needs, qcowOk, run, scratch } from '../../support/qemu.js';
import { applyAnnounced, crashRound, readGuest } from '../../support/crash.js';

const ROUNDS = Number(process.env.QCOW_CRASH_ROUNDS ?? 8);
const SIZE = 16 * 2 ** 20;

// Small clusters: refcount blocks and L2 tables fill up and grow during the run. With 512-byte
// clusters, a 16 KiB metadata budget and rare flushes, L2 tables are evicted between flushes all
// the time (each eviction writing the refcount blocks ahead of the table).
// The third mixes discards in: the writes after them reuse the freed clusters before the next flush.
for (const { clusterSize, cacheBytes, flushOneIn, discardOneIn } of [
  { clusterSize: '4k', cacheBytes: undefined, flushOneIn: 8, discardOneIn: 0 },
  { clusterSize: '512', cacheBytes: 16 * 1024, flushOneIn: 64, discardOneIn: 0 },
  { clusterSize: '4k', cacheBytes: 16 * 1024, flushOneIn: 16, discardOneIn: 6 },
]) {
  test(`a writer killed at random moments leaves no corruption and keeps flushed data (${ROUNDS} rounds, ${clusterSize} clusters${cacheBytes ? `, ${cacheBytes}-byte cache` : ''}${discardOneIn ? ', with discards' : ''})`, needs('qemu-img'), async (t) => {
    const dir = await scratch(t);
    const file = join(dir, 'crash.qcow2');
    await qcowOk(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, file, String(SIZE)]);
    let model: Uint8Array = new Uint8Array(SIZE);
    let flushes = 0;
    let writes = 0;
    let x = 12345;
    for (let round = 0; round < ROUNDS; round++) {
      x = (x * 1103515245 + 12345) >>> 0;
      const lines = await crashRound(file, 'qcow2', round + 1, { afterLines: 20 + (x % 80), thenMs: (x >>> 8) % 30 }, { cacheBytes, flushOneIn, discardOneIn });
      const check = await run('qemu-img', ['check', '--output=json', file]);
      assert.ok(check.code === 0 || check.code === 3, `round ${round}: qemu-img check exit ${check.code}\n${check.stdout}${check.stderr}`);
      assert.equal(JSON.parse(check.stdout).corruptions ?? 0, 0);
      // Writes up to the last completed flush are durable; later ones may or may not have landed.
      const { maybe, lastFlush, flushes: f } = applyAnnounced(lines, model);
      flushes += f;
      writes += lines.length;
      const actual = await readGuest(file, 'qcow2');
      for (let i = 0; i < SIZE; i++) {
        if (!maybe[i] && actual[i] !== model[i]) assert.fail(`round ${round}: byte ${i} is ${actual[i]}, expected ${model[i]} (last flush after ${lastFlush} lines)`);
      }
      // What the image holds now is the starting point of the next round.
      model = actual;
    }
    // The rounds must have exercised something: writes, and flushes between them.
    assert.ok(flushes > 0 && writes > flushes, `only ${writes} writes and ${flushes} flushes in ${ROUNDS} rounds`);
    t.diagnostic(`${writes - flushes} writes, ${flushes} flushes`);
  });
}
