import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isTransientStatus, parseContentRange, readBodyCapped } from '#src/storage/http-request.js';
import { QcowError } from '#src/core/errors.js';

test('Content-Range: a satisfied range, an unknown total, an unsatisfied range', () => {
  assert.deepEqual(parseContentRange('bytes 0-499/1234'), { start: 0, end: 499, total: 1234 });
  assert.deepEqual(parseContentRange('bytes 500-999/*'), { start: 500, end: 999, total: undefined });
  assert.deepEqual(parseContentRange('bytes */1234'), { start: -1, end: -1, total: 1234 });
});

test('Content-Range that contradicts itself is refused', () => {
  for (const bad of [null, '', 'bytes 5-4/10', 'bytes 0-10/10', 'items 0-1/2', 'bytes 0-1']) assert.equal(parseContentRange(bad), undefined, String(bad));
});

test('which statuses are worth retrying', () => {
  assert.deepEqual(
    [408, 429, 500, 502, 503, 504].map(isTransientStatus),
    [true, true, true, true, true, true],
  );
  assert.deepEqual(
    [200, 206, 400, 401, 403, 404, 416, 501].map(isTransientStatus),
    [false, false, false, false, false, false, false, false],
  );
});

/** A reply whose body arrives in the given pieces. */
function replyOf(pieces: number[][]): Response {
  const stream = new ReadableStream<Uint8Array>({
    start(c) {
      for (const p of pieces) c.enqueue(new Uint8Array(p));
      c.close();
    },
  });
  return new Response(stream, { status: 206 });
}

test('readBodyCapped: a body of the expected length, a shorter one, a longer one, one over the limit', async () => {
  const tooLarge = (n: number) => new QcowError('QCOW_IO', `too large: ${n}`);
  // Exactly as expected, in several pieces: the pieces land in order.
  assert.deepEqual([...(await readBodyCapped(replyOf([[1, 2], [3], [4, 5, 6]]), 100, tooLarge, 6))], [1, 2, 3, 4, 5, 6]);
  // Shorter than expected: what came, no more (the caller checks the length).
  assert.deepEqual([...(await readBodyCapped(replyOf([[1, 2], [3]]), 100, tooLarge, 6))], [1, 2, 3]);
  // Longer than expected but under the limit: all of it, in order.
  assert.deepEqual([...(await readBodyCapped(replyOf([[1, 2, 3], [4, 5], [6, 7]]), 100, tooLarge, 4))], [1, 2, 3, 4, 5, 6, 7]);
  // Over the limit: refused, whether the length was expected or not.
  await assert.rejects(readBodyCapped(replyOf([[1, 2, 3], [4, 5, 6]]), 5, tooLarge, 4), /too large: 6/);
  await assert.rejects(readBodyCapped(replyOf([[1, 2, 3], [4, 5, 6]]), 5, tooLarge), /too large: 6/);
  // No expectation: the pieces joined.
  assert.deepEqual([...(await readBodyCapped(replyOf([[9], [8, 7]]), 100, tooLarge))], [9, 8, 7]);
});
