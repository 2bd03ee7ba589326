import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as nodeCodec from '#src/compress/index.node.js';
import * as browserCodec from '#src/compress/index.browser.js';
import { randomBytes } from '../support/qemu.js';
import { QcowError } from '#src/core/errors.js';

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

  test(`${name}: a cluster decompresses into the caller's buffer when one is given`, async () => {
    const big = new Uint8Array(3 * 65536).fill(0xee);
    const into = big.subarray(65536, 2 * 65536);
    for (const [packed, unpack] of [
      [await c.deflateRaw(cluster), c.inflateRaw],
      [await c.zstdCompress(cluster), c.zstdDecompress],
    ] as const) {
      big.fill(0xee);
      const out = await unpack(packed, cluster.length, into);
      assert.equal(out, into, 'the result is the given buffer');
      assert.deepEqual(into, cluster);
      assert.ok(big.subarray(0, 65536).every((b) => b === 0xee) && big.subarray(2 * 65536).every((b) => b === 0xee), 'nothing written outside it');
      await assert.rejects(unpack(randomBytes(300, 3), 65536, into), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT');
    }
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

test('zstd: frames made with the kept context are the bytes of the package\'s one-shot compress()', async () => {
  const { zstdCompressLoaded, zstdReady } = await import('#src/compress/zstd.js');
  await zstdReady();
  const wasm = await import('@bokuweb/zstd-wasm');
  const text = new TextEncoder().encode('qcow2 zstd cluster, level 3; '.repeat(3000));
  const kinds = [
    randomBytes(65536, 31),
    new Uint8Array(65536),
    text.subarray(0, 65536),
    randomBytes(65536, 32).map((b, i) => (i % 7 < 3 ? b : i & 0xff)),
    text.subarray(0, 4096),
    randomBytes(512, 33),
    text, // larger than a cluster, and not a multiple of one
  ];
  // Twice over: a context used before must not change the next frame.
  for (let round = 0; round < 2; round++) {
    for (const k of kinds) assert.deepEqual(zstdCompressLoaded(k), wasm.compress(k, 3));
  }
});

test('node worker pool: many clusters at once round-trip, in order, both codecs', async () => {
  const { CodecPool } = await import('#src/compress/pool.node.js');
  const pool = new CodecPool(2);
  await pool.warm();
  assert.equal(pool.workers, 2);
  const clusters = Array.from({ length: 40 }, (_, i) => {
    const c = randomBytes(65536, i);
    c.fill(i, 0, 20000 + i * 100); // compressible, and different from each other
    return c;
  });
  for (const [pack, unpack] of [['deflate', 'inflate'], ['zstd-compress', 'zstd-decompress']] as const) {
    const packed = await Promise.all(clusters.map((c) => pool.run(pack, c, 0)));
    const back = await Promise.all(packed.map((z) => pool.run(unpack, z, 65536)));
    back.forEach((b, i) => assert.deepEqual(b, clusters[i]));
  }
});

test('node worker pool: the caller keeps its buffer, and errors come back as QCOW_CORRUPT', async () => {
  const { CodecPool } = await import('#src/compress/pool.node.js');
  const pool = new CodecPool(1);
  await pool.warm();
  const big = new Uint8Array(4 * 65536).fill(3);
  const view = big.subarray(65536, 2 * 65536);
  const z = await pool.run('deflate', view, 0);
  assert.equal(big.length, 4 * 65536, 'the source buffer is not detached');
  assert.deepEqual(await pool.run('inflate', z, 65536), view);
  await assert.rejects(pool.run('inflate', randomBytes(9000, 7), 65536), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT');
  await assert.rejects(pool.run('inflate', z, 2 * 65536), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT');
  // A worker's result lands in the caller's buffer when one is given.
  const into = new Uint8Array(65536);
  assert.equal(await pool.run('inflate', z, 65536, into), into);
  assert.deepEqual(into, view);
});

test('node: large compressed inputs (pool path) keep the codec contract', async () => {
  const { CodecPool } = await import('#src/compress/pool.node.js');
  await new CodecPool(1).warm();
  const noisy = randomBytes(65536, 11).map((b, i) => (i % 3 === 0 ? 0 : b));
  const z = await nodeCodec.deflateRaw(noisy);
  assert.ok(z.length > 4096);
  const padded = new Uint8Array(z.length + 512).fill(0xaa);
  padded.set(z);
  assert.deepEqual(await nodeCodec.inflateRaw(padded, 65536), noisy);
  const zs = await nodeCodec.zstdCompress(noisy);
  assert.deepEqual(await nodeCodec.zstdDecompress(zs, 65536), noisy);
});

test('node worker pool: a plain start budget (QCOW_CODEC_START_MS) still starts every worker', async () => {
  const { CodecPool } = await import('#src/compress/pool.node.js');
  const cluster = randomBytes(65536, 21).map((b, i) => (i % 4 === 0 ? 0 : b));
  const z = await nodeCodec.deflateRaw(cluster);
  // A budget no job reaches: everything runs here, no worker is started.
  const never = new CodecPool(2, { startAfterMs: Number.POSITIVE_INFINITY });
  for (let i = 0; i < 20; i++) assert.deepEqual(await never.run('inflate', z, 65536), cluster);
  assert.equal(never.workers, 0);
  // No budget: the first job starts them (and still runs here while they boot).
  const at = new CodecPool(1, 0);
  assert.deepEqual(await at.run('inflate', z, 65536), cluster);
  assert.equal(at.workers, 1);
  await at.warm();
  assert.deepEqual(await at.run('inflate', z, 65536), cluster);
});

test('node worker pool: workers are worth starting only for enough work and idle cores', async () => {
  const { workersWorthStarting, inlineCostNs, handoffCostNs } = await import('#src/compress/pool.node.js');
  const ahead = (op: 'inflate' | 'deflate', jobs: number) => [jobs * inlineCostNs(op, 65536, 65536), jobs * handoffCostNs(op, 65536, 65536)] as const;
  // A small image's worth of clusters: never, whatever the cores.
  assert.equal(workersWorthStarting(...ahead('deflate', 1500), 4, 16), 0);
  // Much deflating: only with cores to spare, and no more workers than there are.
  assert.equal(workersWorthStarting(...ahead('deflate', 100_000), 4, 0), 0);
  assert.equal(workersWorthStarting(...ahead('deflate', 100_000), 4, 0.9), 0);
  const three = workersWorthStarting(...ahead('deflate', 100_000), 4, 3.2);
  assert.ok(three >= 1 && three <= 3, `${three} workers`);
  assert.equal(workersWorthStarting(...ahead('deflate', 100_000), 2, 16) <= 2, true);
  // Inflating costs less than handing it off: never, however much.
  assert.equal(workersWorthStarting(...ahead('inflate', 1_000_000), 4, 16), 0);
});

test('node worker pool: what the caller says is ahead decides, counted down as jobs are done', async () => {
  const { CodecPool } = await import('#src/compress/pool.node.js');
  const data = randomBytes(65536, 22).map((b, i) => (i % 3 === 0 ? 0 : b));
  // Told of much deflating, with cores to spare: the next job starts the workers.
  const told = new CodecPool(4, { idleCores: () => 4 });
  told.expect('deflate', 200_000, 65536);
  const z = await told.run('deflate', data, 0);
  assert.ok(told.workers > 0);
  await told.warm();
  assert.deepEqual(await told.run('inflate', z, 65536), data);
  // The same, on a machine with no core to spare: none.
  const busy = new CodecPool(4, { idleCores: () => 0 });
  busy.expect('deflate', 200_000, 65536);
  for (let i = 0; i < 10; i++) await busy.run('deflate', data, 0);
  assert.equal(busy.workers, 0);
  // Told of little: none, and not told, 40 jobs done here are no reason either.
  const little = new CodecPool(4, { idleCores: () => 4 });
  little.expect('deflate', 30, 65536);
  const guess = new CodecPool(4, { idleCores: () => 4 });
  for (let i = 0; i < 40; i++) {
    await little.run('deflate', data, 0);
    await guess.run('deflate', data, 0);
  }
  assert.equal(little.workers, 0);
  assert.equal(guess.workers, 0);
  // Told of much, but the jobs have since been done elsewhere: nothing is left to pay for them.
  const spent = new CodecPool(4, { idleCores: () => 4 });
  spent.expect('deflate', 200_000, 65536);
  for (let i = 0; i < 200_000; i++) spent.doneElsewhere('deflate', 65536, 65536);
  await spent.run('deflate', data, 0);
  assert.equal(spent.workers, 0);
});

test('node worker pool: the load is read only when workers would pay with every core idle', async () => {
  const { CodecPool } = await import('#src/compress/pool.node.js');
  const data = randomBytes(65536, 23).map((b, i) => (i % 3 === 0 ? 0 : b));
  // Reading the load means loading node:os, which a small job should not pay for.
  let asked = 0;
  const little = new CodecPool(4, { idleCores: () => (asked++, 0) });
  little.expect('deflate', 30, 65536);
  for (let i = 0; i < 40; i++) await little.run('deflate', data, 0);
  assert.equal(asked, 0);
  assert.equal(little.workers, 0);
  // Much work: the load is asked, and here it leaves no core (so no worker starts).
  const much = new CodecPool(4, { idleCores: () => (asked++, 0) });
  much.expect('deflate', 200_000, 65536);
  for (let i = 0; i < 10; i++) await much.run('deflate', data, 0);
  assert.ok(asked > 0);
  assert.equal(much.workers, 0);
});

test('node worker pool: jobs out on a worker that dies are done here from the caller\'s bytes', async () => {
  const { CodecPool } = await import('#src/compress/pool.node.js');
  const pool = new CodecPool(1, 0);
  await pool.warm();
  const clusters = Array.from({ length: 40 }, (_, i) => randomBytes(65536, 100 + i).map((b, j) => (j % 5 === 0 ? 0 : b)));
  const packed = await Promise.all(clusters.map((c) => pool.run('deflate', c, 0)));
  const back = packed.map((z) => pool.run('inflate', z, 65536));
  // The jobs are on their way to (or on) the worker, their copies transferred: end it now.
  const slots = (pool as unknown as { slots: { worker: { terminate(): Promise<number> } }[] }).slots;
  await slots[0]!.worker.terminate();
  const out = await Promise.all(back);
  out.forEach((o, i) => assert.deepEqual(o, clusters[i]));
  assert.equal(pool.workers, 0);
  // And the pool goes on without workers.
  assert.deepEqual(await pool.run('inflate', packed[0]!, 65536), clusters[0]);
});

test('node: the reused deflate state gives deflateRawSync\'s bytes, readable with a 4 KiB window as QEMU reads them', async () => {
  const { deflateRawNow, deflateRawNode } = await import('#src/compress/kernels.node.js');
  const { deflateRawSync, inflateRawSync } = await import('node:zlib');
  const text = new TextEncoder().encode('qcow2 cluster '.repeat(150_000));
  // Mixed kinds and sizes one after the other, with a larger one in the middle (the output
  // buffer grows) and a smaller one after it: each result stands alone.
  const inputs = [
    text.subarray(0, 65536),
    randomBytes(65536, 31),
    new Uint8Array(65536),
    text.subarray(1000, 1000 + 2 * 1024 * 1024),
    randomBytes(512, 32),
    text.subarray(7, 7 + 65536),
  ];
  for (const input of inputs) {
    const z = deflateRawNow(input);
    assert.deepEqual(Buffer.from(z), deflateRawSync(input, { level: 6, windowBits: 12, memLevel: 9 }));
    // node:zlib's own path (no addon) too, on its reused stream.
    assert.deepEqual(Buffer.from(deflateRawNode(input)), deflateRawSync(input, { level: 6, windowBits: 12, memLevel: 9 }));
    assert.deepEqual(new Uint8Array(inflateRawSync(z, { windowBits: 12 })), input);
  }
});

for (const path of ['inflateRawNow', 'inflateRawNode'] as const) test(`node: the reused inflate state keeps the codec contract from one cluster to the next, through failures (${path})`, async () => {
  const inflateRawNow = (await import('#src/compress/kernels.node.js'))[path];
  const { deflateRawSync } = await import('node:zlib');
  const pack = (b: Uint8Array) => new Uint8Array(deflateRawSync(b, { level: 6, windowBits: 12, memLevel: 9 }));
  const text = new TextEncoder().encode('qcow2 cluster '.repeat(20_000));
  const a = text.subarray(0, 65536);
  const b = randomBytes(4096, 41);
  const za = pack(a);
  const zb = pack(b);
  const corruptCode = (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT';
  const garbage = za.slice();
  garbage[0]! ^= 0xff;
  garbage[5]! ^= 0x55;
  const junkAfter = new Uint8Array(zb.length + 300).fill(0xa5);
  junkAfter.set(zb);
  // Each failure, then a good cluster: a failed call leaves nothing behind for the next one.
  const steps: [Uint8Array, number, Uint8Array | RegExp][] = [
    [za, 65536, a],
    [garbage, 65536, /bad deflate data in compressed cluster: /],
    [zb, 4096, b],
    [za.subarray(0, 100), 65536, /inflated to \d+ bytes, expected 65536/],
    [za, 65536, a],
    [za, 4096, /inflates to more than 4096 bytes/],
    [junkAfter, 4096, b],
    [randomBytes(300, 42), 4096, /QCOW_CORRUPT|compressed cluster/],
    [za, 65536, a],
  ];
  for (const [input, size, want] of steps) {
    if (want instanceof Uint8Array) assert.deepEqual(inflateRawNow(input, size), want);
    else assert.throws(() => inflateRawNow(input, size), (e: unknown) => corruptCode(e) && (want.test((e as Error).message) || want.test((e as QcowError).code)));
  }
  // A stream cut short exactly at the cluster's end (no final block) is accepted, as QEMU does.
  const { createDeflateRaw, constants } = await import('node:zlib');
  const d = createDeflateRaw({ level: 6, windowBits: 12, memLevel: 9 });
  const parts: Buffer[] = [];
  d.on('data', (c: Buffer) => parts.push(c));
  d.write(a);
  await new Promise<void>((resolve) => d.flush(constants.Z_SYNC_FLUSH, () => resolve()));
  assert.deepEqual(inflateRawNow(new Uint8Array(Buffer.concat(parts)), 65536), a);
  d.destroy();
});
