/**
 * Crash safety of the qcow v1 writer: a child process writes random data at random offsets
 * (test-support/crash-writer.node.ts) and is killed with SIGKILL at a random moment, QCOW_CRASH_ROUNDS
 * times (default 6) on the same image. After every kill QEMU must still open the image (qemu-img
 * convert and qemu-io read it) and every byte that no write after the last completed flush
 * touched must read back as written, through our reader and through QEMU's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qcowOk, run, runOk, scratch } from '../support/qemu.js';
import { applyAnnounced, crashRound, readGuest } from '../support/crash.js';

const ROUNDS = Number(process.env.QCOW_CRASH_ROUNDS ?? 6);
const SIZE = 8 * 2 ** 20;

async function readQemu(file: string, dir: string): Promise<Uint8Array> {
  const out = join(dir, 'qemu.raw');
  await runOk('qemu-img', ['convert', '-f', 'qcow', '-O', 'raw', file, out]);
  return new Uint8Array(await readFile(out));
}

test(`qcow v1: a writer killed at random moments leaves an image QEMU opens, with flushed data intact (${ROUNDS} rounds)`, needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'crash.qcow');
  await qcowOk(['create', '-q', '-f', 'qcow', file, String(SIZE)]);
  let model: Uint8Array = new Uint8Array(SIZE);
  let flushes = 0;
  let writes = 0;
  let x = 4242;
  for (let round = 0; round < ROUNDS; round++) {
    x = (x * 1103515245 + 12345) >>> 0;
    const lines = await crashRound(file, 'qcow', round + 1, { afterLines: 20 + (x % 80), thenMs: (x >>> 8) % 30 });
    // Bytes a write after the last completed flush touched may hold old or new data (or, for a
    // cluster first allocated then, anything that write may have left): they are not checked.
    const { maybe, lastFlush, flushes: f } = applyAnnounced(lines, model);
    flushes += f;
    writes += lines.length;
    // QEMU opens it: qemu-io reads the whole disk, qemu-img converts it.
    const io = await run('qemu-io', ['-f', 'qcow', '-r', '-c', `read 0 ${SIZE}`, file]);
    assert.equal(io.code, 0, `round ${round}: qemu-io: ${io.stderr}${io.stdout}`);
    assert.doesNotMatch(io.stdout + io.stderr, /error|failed/i, `round ${round}`);
    const ours = await readGuest(file, 'qcow');
    const theirs = await readQemu(file, dir);
    for (let i = 0; i < SIZE; i++) {
      if (maybe[i]) continue;
      if (ours[i] !== model[i]) assert.fail(`round ${round}: our byte ${i} is ${ours[i]}, expected ${model[i]} (last flush after ${lastFlush} of ${lines.length} lines)`);
      if (theirs[i] !== model[i]) assert.fail(`round ${round}: qemu's byte ${i} is ${theirs[i]}, expected ${model[i]}`);
    }
    // Both readers agree on every byte, unflushed ones included.
    assert.ok(Buffer.from(ours).equals(Buffer.from(theirs)), `round ${round}: our reader and qemu's differ`);
    model = ours;
  }
  assert.ok(flushes > 0 && writes > flushes, `only ${writes} writes and ${flushes} flushes in ${ROUNDS} rounds`);
  t.diagnostic(`${writes - flushes} writes, ${flushes} flushes`);
});
