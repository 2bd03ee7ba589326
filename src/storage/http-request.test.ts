import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isTransientStatus, parseContentRange } from './http-request.js';

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
