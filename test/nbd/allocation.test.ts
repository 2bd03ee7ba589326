/**
 * base:allocation of an image without a backing file comes from its own block status in one call
 * (the structured read path asks before every read); it must say what the general chain walk says.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { BlockDevice, BlockExtent } from '#src/core/block-device.js';
import { allocationExtents } from '#src/nbd/allocation.js';

const SIZE = 1 << 20;

/** A device answering block status from a fixed list of extents (covering the whole device). */
function scripted(extents: BlockExtent[], backing: BlockDevice | null = null): BlockDevice {
  return {
    format: 'test',
    filename: 'scripted',
    size: SIZE,
    readOnly: true,
    clusterSize: 4096,
    backing,
    async blockStatus(offset: number, length: number) {
      const end = offset + length;
      return extents
        .filter((e) => e.offset < end && e.offset + e.length > offset)
        .map((e) => ({ ...e, offset: Math.max(e.offset, offset), length: Math.min(end, e.offset + e.length) - Math.max(e.offset, offset) }));
    },
  } as unknown as BlockDevice;
}

function randomExtents(seed: number): BlockExtent[] {
  let x = seed;
  const rnd = (n: number) => ((x = (x * 1103515245 + 12345) & 0x7fffffff), x % n);
  const kinds = [
    { allocated: true, data: true, zero: false },
    { allocated: true, data: false, zero: true },
    { allocated: true, data: true, zero: true },
    { allocated: false, data: false, zero: false },
  ];
  const out: BlockExtent[] = [];
  for (let pos = 0; pos < SIZE; ) {
    const length = Math.min(SIZE - pos, (1 + rnd(16)) * 4096);
    out.push({ offset: pos, length, ...kinds[rnd(kinds.length)]! });
    pos += length;
  }
  return out;
}

test('without a backing file, allocation extents equal those of the chain walk', async () => {
  // Under a backing layer that allocates nothing, the chain walk reports what a single layer's
  // unallocated ranges read as (holes of zeros): the same answers, the general way.
  const nothing = scripted([{ offset: 0, length: SIZE, allocated: false, data: false, zero: false }]);
  for (let seed = 1; seed <= 20; seed++) {
    const extents = randomExtents(seed);
    const alone = scripted(extents);
    const chained = scripted(extents, nothing);
    for (const [offset, length, max] of [
      [0, SIZE, undefined],
      [4096 * seed, 256 * 1024, undefined],
      [12345 * seed, 100_000, 3],
      [SIZE - 5000, 5000, 1],
    ] as const) {
      assert.deepEqual(await allocationExtents(alone, offset, length, max), await allocationExtents(chained, offset, length, max), `seed ${seed} [${offset}, +${length}) max ${max}`);
    }
  }
});

test('a block status answer with a gap is not turned into a reply that skips bytes', async () => {
  const gapped = scripted([
    { offset: 0, length: 4096, allocated: true, data: true, zero: false },
    { offset: 8192, length: SIZE - 8192, allocated: true, data: true, zero: false },
  ]);
  await assert.rejects(allocationExtents(gapped, 0, 65536), /did not cover/);
});
