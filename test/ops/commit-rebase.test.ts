/** commit and rebase on in-memory chains: what moves where, and that the guest never sees a change. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { commit } from '#src/ops/commit.js';
import { rebase } from '#src/ops/rebase.js';
import { MemOverlay, fill, memRaw, readAll } from './devices.test-helpers.js';
import { QcowError } from '#src/core/errors.js';

const KiB = 1024;

test('commit writes the overlay into its backing file, grows it, and empties the overlay', async () => {
  const base = await memRaw(64 * KiB, 'base.raw');
  await fill(base, 0, 64 * KiB, 0x11);
  const top = new MemOverlay(96 * KiB, base);
  await fill(top, 4 * KiB, 100, 0x22); // partial cluster: the rest of it is the base's bytes
  await top.writeZeroes(16 * KiB, 8 * KiB);
  await fill(top, 80 * KiB, 4 * KiB, 0x33); // beyond the base's end
  const before = await readAll(top);
  await commit(top, {});
  assert.equal(base.size, 96 * KiB);
  assert.deepEqual(await readAll(base), before);
  assert.equal(top.ownBytes(), 0);
  assert.deepEqual(await readAll(top), before);
});

test('commit -d keeps the overlay; committing into a deeper base implies it', async () => {
  const base = await memRaw(32 * KiB, 'base.raw');
  const mid = new MemOverlay(32 * KiB, base, 'mid');
  await fill(mid, 0, 4 * KiB, 1);
  const top = new MemOverlay(32 * KiB, mid, 'top');
  await fill(top, 8 * KiB, 4 * KiB, 2);
  const want = await readAll(top);
  await commit(top, { base });
  assert.deepEqual(await readAll(base), want);
  assert.equal(top.ownBytes(), 4 * KiB, 'top kept as it was');
  await assert.rejects(commit(base), (e: unknown) => e instanceof QcowError && /Image does not have a backing file/.test(e.message));
});

test('commit refuses an overlay its format cannot empty, unless -d', async () => {
  const base = await memRaw(8 * KiB);
  const top = new MemOverlay(8 * KiB, base);
  Object.defineProperty(top, 'makeEmpty', { value: undefined });
  await assert.rejects(commit(top), /cannot empty an image after commit/);
  await commit(top, { drop: true });
});

test('safe rebase copies exactly the sectors where the old and new backing files differ', async () => {
  const oldBase = await memRaw(64 * KiB, 'old.raw');
  await fill(oldBase, 0, 64 * KiB, 0xaa);
  const newBase = await memRaw(32 * KiB, 'new.raw'); // shorter: zeros past its end
  await fill(newBase, 0, 32 * KiB, 0xaa);
  await fill(newBase, 1000, 10, 0xbb); // one differing sector at [512, 1024) and one at [1024, 1536)
  const img = new MemOverlay(64 * KiB, oldBase);
  await fill(img, 40 * KiB, 4 * KiB, 0x01); // decided by the image itself: untouched
  const want = await readAll(img);
  await rebase(img, { newBacking: newBase, backingName: 'new.raw', backingFormat: 'raw' });
  assert.equal(img.backingName, 'new.raw');
  assert.equal(img.backingFormat, 'raw');
  // Now read through the new chain.
  img.backing = newBase;
  assert.deepEqual(await readAll(img), want);
  // Cluster 0 (the differing sectors) and [32K, 64K) past the new base's end are the image's own.
  assert.deepEqual([...img.clusters.keys()].sort((a, b) => a - b), [0, 8, 9, 10, 11, 12, 13, 14, 15]);
});

test('rebase onto nothing flattens; -u only renames; a base of the old chain copies only what lies above it', async () => {
  const base = await memRaw(16 * KiB, 'base.raw');
  await fill(base, 0, 16 * KiB, 5);
  const mid = new MemOverlay(16 * KiB, base, 'mid');
  await fill(mid, 4 * KiB, 4 * KiB, 6);
  const img = new MemOverlay(16 * KiB, mid, 'img');
  const want = await readAll(img);

  let reads = 0;
  const read = base.read.bind(base);
  base.read = async (o, b) => {
    reads++;
    return read(o, b);
  };
  await rebase(img, { newBacking: base, backingName: 'base.raw', backingFormat: 'raw' });
  assert.equal(reads, 1, 'only the range mid allocates was compared');
  assert.deepEqual([...img.clusters.keys()], [1]);
  img.backing = base;
  assert.deepEqual(await readAll(img), want);

  await rebase(img, { newBacking: null, backingName: null, backingFormat: null });
  img.backing = null;
  assert.deepEqual(await readAll(img), want);
  assert.equal(img.backingName, null);

  await rebase(img, { newBacking: null, backingName: 'elsewhere.raw', backingFormat: 'raw', unsafe: true });
  assert.equal(img.backingName, 'elsewhere.raw');
  assert.deepEqual(await readAll(img), want, 'unsafe rebase copies nothing, changes nothing else');
});
