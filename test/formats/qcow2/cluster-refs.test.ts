import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ClusterRefs } from '#src/formats/qcow2/cluster-refs.js';
import { REFCOUNT_WIDTHS, setRefcount } from '#src/formats/qcow2/refcount.js';

test('ClusterRefs counts references per cluster, inside and past the file', () => {
  const refs = new ClusterRefs(100);
  assert.equal(refs.highest, -1);
  refs.addRange(0, 0);
  refs.addRange(10, 12);
  refs.addRange(12, 12);
  refs.addRange(150, 151); // past the end of the file: a corrupt table, or a compressed tail
  assert.deepEqual([0, 9, 10, 11, 12, 13, 150, 151, 152].map((c) => refs.get(c)), [1, 0, 1, 1, 2, 0, 1, 1, 0]);
  assert.equal(refs.highest, 151);
  assert.equal(refs.anyIn(1, 10), false);
  assert.equal(refs.anyIn(1, 11), true);
  assert.equal(refs.anyIn(100, 150), false);
  assert.equal(refs.anyIn(100, 151), true);
});

test('ClusterRefs keeps counting past 65 535 references to one cluster', () => {
  const refs = new ClusterRefs(4);
  for (let i = 0; i < 70000; i++) refs.addRange(2, 2);
  assert.equal(refs.get(2), 70000);
  assert.equal(refs.get(1), 0);
  assert.equal(refs.get(3), 0);
});

test('ClusterRefs lists the referenced clusters from a point on, in order', () => {
  const refs = new ClusterRefs(10);
  refs.addRange(12, 12);
  refs.addRange(3, 4);
  refs.addRange(2 ** 40, 2 ** 40); // a corrupt entry far past the file
  refs.addRange(9, 9);
  assert.deepEqual(refs.countsFrom(4), [
    [4, 1],
    [9, 1],
    [12, 1],
    [2 ** 40, 1],
  ]);
  assert.deepEqual(refs.countsFrom(11), [
    [12, 1],
    [2 ** 40, 1],
  ]);
});

test('ClusterRefs gives the cluster-by-cluster counts for long, overlapping and file-crossing ranges', () => {
  const clusters = 3000;
  const refs = new ClusterRefs(clusters);
  const model = new Map<number, number>();
  let seed = 11;
  const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
  const ranges: Array<[number, number]> = [
    [0, 999], // first reference to a long range
    [500, 1499], // half of it again
    [2990, 3020], // across the end of the file
    [1000, 1000],
  ];
  for (let i = 0; i < 200; i++) {
    const first = rand(clusters + 50);
    ranges.push([first, first + (i % 4 === 0 ? rand(600) : rand(20))]);
  }
  for (const [first, last] of ranges) {
    refs.addRange(first, last);
    for (let c = first; c <= last; c++) model.set(c, (model.get(c) ?? 0) + 1);
  }
  for (let c = 0; c < clusters + 700; c++) assert.equal(refs.get(c), model.get(c) ?? 0, `cluster ${c}`);
  assert.equal(refs.highest, Math.max(...ranges.map((r) => r[1])));
});

test('ClusterRefs knows the most references any cluster has, past the 16-bit array too', () => {
  const refs = new ClusterRefs(10);
  assert.equal(refs.peak, 0);
  refs.addRange(0, 5);
  refs.addRange(3, 3);
  assert.equal(refs.peak, 2);
  refs.addRange(20, 20); // past the file: kept in the Map
  refs.addRange(20, 20);
  refs.addRange(20, 20);
  assert.equal(refs.peak, 3);
  for (let i = 0; i < 0x10001; i++) refs.addRange(7, 7);
  assert.equal(refs.peak, 0x10001);
});

test('ClusterRefs finds where its counts part from a 16-bit refcount block, and the last referenced cluster', () => {
  const refs = new ClusterRefs(40);
  refs.addRange(8, 11);
  refs.addRange(10, 10);
  // A block whose entry 0 is cluster 8: counts 1, 1, 2, 1 then zeros, as found.
  const block = new Uint8Array(64);
  for (const [i, n] of [[0, 1], [1, 1], [2, 2], [3, 1]]) block[2 * i + 1] = n!;
  assert.equal(refs.sameAsStored(block, 16, 8, 8, 40), 40);
  assert.equal(refs.lastReferenced(8, 40), 11);
  assert.equal(refs.lastReferenced(12, 40), -1);
  block[2 * 5 + 1] = 1; // cluster 13: stored 1, found 0
  assert.equal(refs.sameAsStored(block, 16, 8, 9, 40), 13);
  assert.equal(refs.sameAsStored(block, 16, 8, 14, 40), 40);
  block[2 * 2] = 1; // cluster 10: stored 0x0102
  assert.equal(refs.sameAsStored(block, 16, 8, 8, 13), 10);
  // A count kept in the Map (0xffff and up) is always left to the caller.
  const big = new ClusterRefs(4);
  for (let i = 0; i < 0xffff; i++) big.addRange(1, 1);
  const full = new Uint8Array(8).fill(0);
  full[2] = 0xff;
  full[3] = 0xff;
  assert.equal(big.sameAsStored(full, 16, 0, 0, 4), 1);
  // Past the array: left to the caller too.
  assert.equal(new ClusterRefs(2).sameAsStored(new Uint8Array(8), 16, 0, 0, 4), 2);
});

test('ClusterRefs compares its counts with refcount blocks of every width', () => {
  for (const bits of REFCOUNT_WIDTHS) {
    const refs = new ClusterRefs(40);
    refs.addRange(8, 11);
    if (bits > 1) refs.addRange(10, 10);
    // A block of 32 entries whose entry 0 is cluster 8, holding the counts found.
    const block = new Uint8Array((32 * bits) / 8);
    for (let c = 8; c < 40; c++) setRefcount(block, c - 8, bits, refs.get(c));
    assert.equal(refs.sameAsStored(block, bits, 8, 8, 40), 40, `${bits} bits`);
    setRefcount(block, 5, bits, 1); // cluster 13: stored 1, found 0
    assert.equal(refs.sameAsStored(block, bits, 8, 9, 40), 13, `${bits} bits`);
    assert.equal(refs.sameAsStored(block, bits, 8, 14, 40), 40, `${bits} bits`);
    setRefcount(block, 2, bits, 0); // cluster 10: stored 0
    assert.equal(refs.sameAsStored(block, bits, 8, 8, 13), 10, `${bits} bits`);
    if (bits >= 32) {
      // A high word that is not zero differs, whatever the low bits say.
      setRefcount(block, 2, bits, refs.get(10) + 2 ** (bits === 32 ? 24 : 40));
      assert.equal(refs.sameAsStored(block, bits, 8, 8, 13), 10, `${bits} bits`);
    }
  }
});
