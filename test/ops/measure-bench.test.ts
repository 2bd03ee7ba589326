/** measure's arithmetic (numbers qemu-img 7.2 printed for the same inputs) and bench's workload. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { measure } from '#src/ops/measure.js';
import { luksHeaderBytes, qcow2FullSize } from '#src/formats/qcow2/measure.js';
import { builtinFormats } from '#src/formats/index.js';
import { bench, benchHeader, benchPlan } from '#src/ops/bench.js';
import { fill, memQcow2, memRaw } from './devices.test-helpers.js';

const MiB = 2 ** 20;
const formats = builtinFormats();
const [qcow2, raw, qcow] = [formats.get('qcow2'), formats.get('raw'), formats.get('qcow')];

test('fully allocated qcow2 sizes are the ones qemu-img measure prints', () => {
  assert.equal(qcow2FullSize(2 ** 30, 65536, 16, false), 1074135040);
  assert.equal(qcow2FullSize(64 * MiB, 65536, 16, false), 67436544);
  assert.equal(qcow2FullSize(2 ** 30, 65536, 16, true), 1074266112);
  assert.equal(qcow2FullSize(0, 65536, 16, false), 196608);
  assert.equal(luksHeaderBytes('aes-256', 'xts'), 2068480);
});

test('required counts whole target clusters holding data; --size counts metadata only', async () => {
  assert.deepEqual(await measure({ format: qcow2, size: 2 ** 30 }), { required: 393216, 'fully-allocated': 1074135040 });
  assert.deepEqual(await measure({ format: raw, size: 1000 }), { required: 1024, 'fully-allocated': 1024 });
  const src = await memQcow2(64 * MiB);
  await fill(src, 0, 100, 1); // one 64k cluster
  await fill(src, 10 * MiB + 4096, 4096, 2); // another
  const r = await measure({ format: qcow2, source: src });
  assert.equal(r.required, 67436544 - 64 * MiB + 2 * 65536);
  assert.equal(r.bitmaps, 0);
  const small = await measure({ format: qcow2, source: src, options: { cluster_size: '4096', compat: '0.10' } });
  assert.equal(small.bitmaps, undefined);
  await assert.rejects(measure({ format: qcow, size: MiB }), /Block driver 'qcow' does not support size measurement/);
  await assert.rejects(measure({ format: qcow2, size: MiB, options: { foo: '1' }, knownOptions: { size: '' } }), /Invalid parameter 'foo'/);
});

test('bench: defaults and checks as qemu-img, requests wrap around the image, writes carry the pattern', async () => {
  assert.equal(benchHeader(benchPlan({})), 'Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)');
  assert.throws(() => benchPlan({ flushInterval: 8 }), /only available in write tests/);
  assert.throws(() => benchPlan({ write: true, flushInterval: 2, depth: 4 }), /can't be smaller than depth/);
  assert.throws(() => benchPlan({ pattern: 256, write: true }), /Invalid pattern byte/);
  const dev = await memRaw(64 * 1024);
  await bench(dev, benchPlan({ count: 40, depth: 3, write: true, pattern: 0x5a, bufferSize: 4096, flushInterval: 8 }));
  const all = new Uint8Array(dev.size);
  await dev.read(0, all);
  assert.ok(all.every((b) => b === 0x5a), '40 requests of 4k over 64k wrap and cover it all');
  await assert.rejects(bench(dev, benchPlan({ count: 2, offset: 64 * 1024 - 100 })), /beyond the end/);
});
