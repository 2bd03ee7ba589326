/**
 * compareImages on in-memory images. Its reads start at 256 KiB and double up to 2 MiB as the data
 * compared grows (ops/compare.ts): a difference anywhere in a long run of data, before, at and
 * after each change of read size, is found at its sector.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { compareImages } from '#src/ops/compare.js';
import { memQcow2, memRaw } from './devices.test-helpers.js';
import { randomBytes } from '../support/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

test('a byte that differs anywhere in a long data run is reported at its sector, whatever the read size there', async () => {
  const size = 20 * MiB;
  const data = randomBytes(size, 7);
  const a = await memRaw(data);
  // Read sizes change at 2, 4 and 8 MiB compared: look around each, at the ends and between.
  const places = [0, 511, 256 * KiB - 1, 256 * KiB, 2 * MiB - 1, 2 * MiB + 700, 4 * MiB - 3, 8 * MiB, 13 * MiB + 12345, 16 * MiB + 5, size - 1];
  for (const at of places) {
    const changed = data.slice();
    changed[at] ^= 0x5a;
    const r = await compareImages(a, await memRaw(changed));
    assert.deepEqual(r, { identical: false, sizeMismatch: false, offset: at - (at % 512), reason: 'content' }, `byte ${at}`);
  }
  assert.deepEqual(await compareImages(a, await memRaw(data.slice())), { identical: true, sizeMismatch: false });
});

test('qcow2 against raw: the same data reads the same past the first reads, and a late difference is found', async () => {
  const data = randomBytes(6 * MiB, 9);
  const q = await memQcow2(6 * MiB);
  await q.write(0, data);
  assert.equal((await compareImages(q, await memRaw(data.slice()))).identical, true);
  const changed = data.slice();
  changed[5 * MiB + 4097] ^= 1;
  assert.deepEqual(await compareImages(q, await memRaw(changed)), { identical: false, sizeMismatch: false, offset: 5 * MiB + 4096, reason: 'content' });
});
