/**
 * A 4 TiB sparse qcow2 image opens at once and reads with bounded memory: the L1 table stays a
 * byte array (64 KiB here), L2 tables are loaded on demand into a bounded cache.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openImage } from '#src/node.js';
import { mapChain } from '#src/ops/map.js';
import { needs, qemuImg, qemuIo, scratch } from '../../support/qemu.js';
import type { Qcow2Device } from '#src/formats/qcow2/qcow2.js';

const TiB = 2 ** 40;

test('a 4 TiB sparse image opens, maps and reads with bounded memory', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const path = join(dir, 'big.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', path, '4T']);
  // Data near the start, in the middle and at the very end.
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x22 2T 64k', '-c', `write -P 0x33 ${4 * TiB - 65536} 64k`, path]);

  global.gc?.();
  const rssBefore = process.memoryUsage().rss;
  // A 1 MiB L2 budget: 16 whole tables of 64 KiB, or 256 of the 4 KiB slices a read-only open caches.
  const dev = (await openImage(path, { readOnly: true, cacheBytes: 1 << 20 })) as Qcow2Device;
  try {
    assert.equal(dev.size, 4 * TiB);
    const buf = new Uint8Array(65536);
    for (const [off, byte] of [
      [0, 0x11],
      [2 * TiB, 0x22],
      [4 * TiB - 65536, 0x33],
      [TiB + 12345, 0],
    ] as const) {
      await dev.read(off, buf);
      assert.ok(buf.every((b) => b === byte), `content at ${off}`);
    }
    // Touch many distinct L2 regions (one L2 table maps 512 MiB): the cache must stay within budget.
    for (let off = 0; off < 4 * TiB; off += 64 * 2 ** 30) await dev.read(off, buf.subarray(0, 512));
    assert.ok(dev.l2Cache.size * dev.slice.bytes <= 1 << 20, `cached slices: ${dev.l2Cache.size} of ${dev.slice.bytes} bytes`);

    // Walking the whole device's allocation visits each L1 entry once, not each cluster.
    const extents = [];
    for await (const e of mapChain(dev)) extents.push(e);
    assert.deepEqual(
      extents.filter((e) => e.data).map((e) => [e.start, e.length]),
      [
        [0, 65536],
        [2 * TiB, 65536],
        [4 * TiB - 65536, 65536],
      ],
    );
    const growth = process.memoryUsage().rss - rssBefore;
    assert.ok(growth < 64 * 2 ** 20, `rss grew by ${growth} bytes`);
  } finally {
    await dev.close();
  }
});

test('read-only and writable opens cache L2 slices: 4 KiB per table touched, whatever the cluster size, with the same answers', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const cluster of ['2M', '64k', '4k']) {
    const path = join(dir, `slices-${cluster}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, path, '64G']);
    // Data in several slices of one table and in several tables, with holes and a zero cluster.
    await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x22 40M 4k', '-c', 'write -P 0x33 3G 2M', '-c', 'write -z 3G 64k', '-c', 'write -P 0x44 63G 1M', path]);
    // The read-only open shares writing (as qemu-img -U), or the writer's QEMU lock would refuse it.
    const ro = (await openImage(path, { readOnly: true, forceShare: true })) as Qcow2Device;
    const rw = (await openImage(path)) as Qcow2Device;
    try {
      assert.equal(ro.slice.bytes, 4096);
      assert.equal(rw.slice.bytes, 4096, 'writable opens cache slices too');
      const a = new Uint8Array(3 << 20);
      const b = new Uint8Array(3 << 20);
      for (const off of [0, 40 * 2 ** 20 - 4096, 3 * 2 ** 30 - 65536, 63 * 2 ** 30 - 4096]) {
        await ro.read(off, a);
        await rw.read(off, b);
        assert.ok(Buffer.from(a).equals(Buffer.from(b)), `${cluster}: content at ${off}`);
      }
      // The same reads held the same slices, a few of them (whole tables would be 64 KiB or 2 MiB each).
      assert.equal(ro.l2Cache.size, rw.l2Cache.size);
      assert.ok(rw.l2Cache.size * rw.slice.bytes <= 64 * 1024, `${cluster}: ${rw.l2Cache.size} slices cached`);
      const extents = async (d: Qcow2Device) => {
        const out = [];
        for await (const e of mapChain(d)) out.push(e);
        return out;
      };
      assert.deepEqual(await extents(ro), await extents(rw), `${cluster}: map`);
    } finally {
      await ro.close();
      await rw.close();
    }
  }
});
