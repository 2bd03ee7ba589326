/**
 * The stream reader's byte side: pieces come out in order and whole whatever sizes the input
 * gives them in (a source read at odd sizes, chunks smaller and larger than a piece), stay intact
 * while the next `retain` pieces are taken and while pinned, and reused memory stays bounded.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ClusterReader } from '#src/streams/cluster-reader.js';
import { ODD_SIZES, oddChunks, oddSource } from '../support/odd-stream.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Bytes that differ at every offset within any piece we take (a position pattern, not zeros). */
function pattern(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + (i >>> 8) * 13 + (i >>> 16)) & 0xff;
  return b;
}

for (const kind of ['source', 'chunks'] as const) {
  test(`${kind}: pieces in order, whole, and the last ${2} still intact when the next is taken`, async () => {
    for (const piece of [512, 64 * KiB, 2 * MiB]) {
      const data = pattern(9 * MiB + 777);
      const input = kind === 'source' ? oddSource(data, ODD_SIZES) : oddChunks(data, ODD_SIZES);
      const reader = new ClusterReader(input);
      const held: { at: number; view: Uint8Array }[] = [];
      // A header of 512 bytes first, then pieces of one size, as the qcow2 reader takes them.
      for (let n = 512; ; n = piece) {
        const at = reader.offset;
        const view = await reader.take(n);
        assert.equal(reader.offset, at + view.length);
        held.push({ at, view });
        // The qcow2 reader looks back two clusters: the current piece and the two before it.
        if (held.length > 3) held.shift();
        for (const h of held) assert.deepEqual(h.view, data.subarray(h.at, h.at + h.view.length), `${kind}, ${piece}-byte pieces: the piece at ${h.at}`);
        if (view.length < n) break;
      }
      assert.equal(reader.offset, data.length);
      assert.equal((await reader.take(piece)).length, 0);
    }
  });

  test(`${kind}: a pinned piece stays intact until unpinned; peek leaves the bytes in the stream`, async () => {
    const data = pattern(12 * MiB);
    const reader = new ClusterReader(kind === 'source' ? oddSource(data, ODD_SIZES) : oddChunks(data, ODD_SIZES));
    assert.deepEqual(await reader.peek(8), data.subarray(0, 8));
    assert.equal(reader.offset, 0);
    const first = await reader.take(64 * KiB);
    assert.deepEqual(first, data.subarray(0, 64 * KiB));
    // Pieces of the reader's own memory can be pinned; views of the input's chunks need not be.
    const pinned = reader.pin(first);
    for (let i = 0; i < 150; i++) await reader.take(64 * KiB);
    assert.deepEqual(first, data.subarray(0, 64 * KiB));
    if (pinned) reader.unpin(first);
    const rest = [];
    for (let p = await reader.take(MiB); p.length > 0; p = await reader.take(MiB)) rest.push(p.slice());
    assert.equal(rest.reduce((s, p) => s + p.length, 0), data.length - 151 * 64 * KiB);
  });
}

test('source: pieces ready-made in the reader memory, in a few reused slabs', async () => {
  const data = pattern(64 * MiB);
  const source = oddSource(data, [64 * KiB]);
  const reader = new ClusterReader(source);
  const buffers = new Set<ArrayBufferLike>();
  for (let p = await reader.take(64 * KiB); p.length > 0; p = await reader.take(64 * KiB)) buffers.add(p.buffer);
  // 1024 pieces from a handful of slabs, never an array per piece.
  assert.ok(buffers.size <= 4, `${buffers.size} buffers`);
  assert.equal(source.reads, 64 * 16 + 1);
});

test('source: a stream that ends inside a piece gives what there is, then nothing', async () => {
  const data = pattern(5 * 64 * KiB + 1000);
  const reader = new ClusterReader(oddSource(data, [3000]));
  for (let i = 0; i < 5; i++) assert.equal((await reader.take(64 * KiB)).length, 64 * KiB);
  const tail = await reader.take(64 * KiB);
  assert.deepEqual(tail, data.subarray(5 * 64 * KiB));
  assert.equal((await reader.take(64 * KiB)).length, 0);
});

test('pieces(): raw input as it comes, every byte once', async () => {
  const data = pattern(5 * MiB + 3);
  for (const input of [oddSource(data, ODD_SIZES), oddChunks(data, ODD_SIZES)]) {
    const reader = new ClusterReader(input);
    const out = new Uint8Array(data.length);
    let at = 0;
    for await (const p of reader.pieces()) {
      out.set(p, at);
      at += p.length;
    }
    assert.equal(at, data.length);
    assert.deepEqual(out, data);
  }
});
