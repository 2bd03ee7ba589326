import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ClusterRefs } from './cluster-refs.js';

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
