import { test } from 'node:test';
import assert from 'node:assert/strict';
import { alignedBuffer, alignedBuffers } from '#src/core/aligned.js';

test('alignedBuffers: separate zeroed buffers of the size asked, each starting on a page of one memory', () => {
  const size = 2 * 1024 * 1024 + 100;
  const list = alignedBuffers(3, size);
  assert.equal(list.length, 3);
  for (const b of list) {
    assert.equal(b.length, size);
    assert.equal(b.byteOffset % 4096, 0, 'each buffer starts a page into the memory');
    assert.ok(b.every((x) => x === 0));
  }
  // A WebAssembly memory starts on a page boundary; the buffers are cut from one.
  assert.ok(list.every((b) => b.buffer === list[0]!.buffer));
  list[0]!.fill(1);
  list[2]!.fill(3);
  assert.ok(list[1]!.every((x) => x === 0), 'writing one buffer leaves its neighbours alone');
  assert.equal(list[0]![size - 1], 1);
});

test('alignedBuffers: plain arrays when WebAssembly refuses the memory, and for small sizes', (t) => {
  t.mock.method(WebAssembly, 'Memory', function refuse() {
    throw new RangeError('WebAssembly.Memory(): could not allocate memory');
  });
  const big = alignedBuffers(2, 1 << 20);
  assert.equal(big.length, 2);
  assert.notEqual(big[0]!.buffer, big[1]!.buffer);
  assert.equal(big[0]!.length, 1 << 20);
  t.mock.restoreAll();
  const small = alignedBuffer(4096);
  assert.equal(small.length, 4096);
  assert.equal(small.byteOffset, 0);
});
