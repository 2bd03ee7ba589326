import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as nodeCodec from './index.node.js';
import * as browserCodec from './index.browser.js';
import { randomBytes } from '../test-support/qemu.js';
import { QcowError } from '../core/errors.js';

const cluster = new Uint8Array(65536).map((_, i) => (i * 7) % 13);

for (const [name, c] of [
  ['node', nodeCodec],
  ['browser', browserCodec],
] as const) {
  test(`${name}: raw deflate round-trips one cluster and ignores bytes after the stream`, async () => {
    const z = await c.deflateRaw(cluster);
    assert.ok(z.length < cluster.length);
    const padded = new Uint8Array(z.length + 700);
    padded.set(z);
    padded.fill(0x55, z.length);
    assert.deepEqual(await c.inflateRaw(padded, cluster.length), cluster);
  });

  test(`${name}: a deflate stream that is short or garbage is QCOW_CORRUPT`, async () => {
    const z = await c.deflateRaw(cluster);
    await assert.rejects(c.inflateRaw(z, cluster.length * 2), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT');
    await assert.rejects(c.inflateRaw(randomBytes(300, 3), 4096), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT');
  });

  test(`${name}: zstd decodes only the first frame when two are back to back`, async () => {
    const a = await c.zstdCompress(cluster);
    const other = await c.zstdCompress(new Uint8Array(65536).fill(9));
    const both = new Uint8Array(a.length + other.length);
    both.set(a);
    both.set(other, a.length);
    assert.deepEqual(await c.zstdDecompress(both, cluster.length), cluster);
    await assert.rejects(c.zstdDecompress(randomBytes(100, 5), 4096), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT');
  });
}
