/**
 * ChainStatus answers a span synchronously (atNow) when its layers have it cached, and bounds
 * how many extents a layer's answer holds. These tests hold both to the plain definition: each
 * cluster's status is that of the first layer, from the top, that allocates it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockDevice, BlockExtent } from '#src/core/block-device.js';
import { ChainStatus, mapChain } from '#src/ops/chain-status.js';
import { mapEntryJson, mapJson } from '#src/ops/map.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A layer whose cluster `i` is allocated when `owns(i)`; records the length of every answer. */
function layer(name: string, size: number, cluster: number, owns: (i: number) => boolean, backing: BlockDevice | null, answers: number[] = []) {
  const dev = {
    filename: name,
    size,
    backing,
    async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
      const out: BlockExtent[] = [];
      for (let at = offset; at < offset + length; ) {
        const i = Math.floor(at / cluster);
        const end = Math.min(offset + length, (i + 1) * cluster);
        const allocated = owns(i);
        const last = out[out.length - 1];
        if (last && last.allocated === allocated) last.length += end - at;
        else out.push({ offset: at, length: end - at, allocated, zero: false, data: allocated });
        at = end;
      }
      answers.push(out.length);
      return out;
    },
  };
  return dev as unknown as BlockDevice;
}

test('atNow answers only from cached extents, and then as at() does', async () => {
  const cs = 64 * KiB;
  const size = 8 * MiB;
  const base = layer('base', size, cs, () => true, null);
  const mid = layer('mid', size, cs, (i) => i % 3 === 1, base);
  const top = layer('top', size, cs, (i) => i % 5 === 0, mid);
  const status = new ChainStatus(top);
  assert.equal(status.atNow(0, size), undefined, 'nothing asked yet');
  const depthOf = (i: number) => (i % 5 === 0 ? 0 : i % 3 === 1 ? 1 : 2);
  for (let off = 0; off < size; ) {
    const now = status.atNow(off, size - off);
    const e = await status.at(off, size - off);
    if (now) assert.deepEqual(now, e);
    const i = off / cs;
    assert.equal(e.depth, depthOf(i), `depth at cluster ${i}`);
    assert.equal(e.present, true);
    // A span ends where the deciding layer changes, never later.
    for (let k = off; k < off + e.length; k += cs) assert.equal(depthOf(k / cs), e.depth);
    off += e.length;
  }
});

test('a layer answering with very many extents is asked in smaller windows', async () => {
  const cs = 4 * KiB;
  const size = 1024 * MiB;
  const answers: number[] = [];
  // Allocation changes at every cluster: 262144 extents over the image.
  const top = layer('top', size, cs, (i) => i % 2 === 0, null, answers);
  let count = 0;
  let covered = 0;
  for await (const e of mapChain(top)) {
    count++;
    assert.equal(e.start, covered);
    assert.equal(e.present, (e.start / cs) % 2 === 0);
    assert.equal(e.length, cs);
    covered += e.length;
  }
  assert.equal(covered, size);
  assert.equal(count, size / cs);
  // The first answer (64 MiB) is long; after it, no answer holds more than 4096 extents.
  assert.ok(answers.length > 1);
  assert.ok(Math.max(...answers.slice(1)) <= 4096, `answers: ${answers.join(' ')}`);
});

test('short answers still widen the window (a sparse layer is walked in a few calls)', async () => {
  const size = 4 * 1024 * 1024 * MiB;
  const answers: number[] = [];
  const top = layer('sparse', size, 64 * KiB, (i) => i === 3, null, answers);
  const out = [];
  for await (const e of mapChain(top)) out.push([e.start, e.length, e.present]);
  assert.deepEqual(out, [
    [0, 3 * 64 * KiB, false],
    [3 * 64 * KiB, 64 * KiB, true],
    [4 * 64 * KiB, size - 4 * 64 * KiB, false],
  ]);
  assert.ok(answers.length <= 12, `${answers.length} calls`);
});

test('mapJson joins its lines in chunks into the same text, one extent a line', async () => {
  // 8 MiB of 4 KiB clusters alternating between two layers: 2048 extents, four chunks of lines.
  const cs = 4 * KiB;
  const size = 8 * MiB;
  const base = layer('base', size, cs, () => true, null);
  const top = layer('top', size, cs, (i) => i % 2 === 0, base);
  const extents = [];
  for await (const e of mapChain(top)) extents.push(e);
  assert.equal(extents.length, 2048);
  const text = await mapJson(top);
  assert.equal(text, `[${extents.map(mapEntryJson).join(',\n')}]\n`);
  assert.equal(text.split('\n').length, 2048 + 1);
  // A range shorter than one chunk, and one ending inside the second chunk.
  assert.equal(await mapJson(top, 0, 40 * cs), `[${extents.slice(0, 40).map(mapEntryJson).join(',\n')}]\n`);
  assert.equal(await mapJson(top, 0, 600 * cs), `[${extents.slice(0, 600).map(mapEntryJson).join(',\n')}]\n`);
});
