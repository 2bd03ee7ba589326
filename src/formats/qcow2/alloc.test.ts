import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { needs, qemuImg, run, scratch } from '../../test-support/qemu.js';
import { FileStore } from '../../storage/file.node.js';
import { MemoryStore } from '../../storage/memory.js';
import { decodeHeader } from './header.js';
import { Refcounts } from './alloc.js';

async function openRefcounts(store: FileStore | MemoryStore): Promise<Refcounts> {
  const head = new Uint8Array(4096);
  await store.read(0, head);
  const h = decodeHeader(head);
  return Refcounts.load(store, {
    clusterSize: 2 ** h.clusterBits,
    refcountBits: 2 ** h.refcountOrder,
    tableOffset: h.refcountTableOffset,
    tableClusters: h.refcountTableClusters,
  });
}

async function writeBack(rc: Refcounts, store: FileStore): Promise<void> {
  await rc.writeBack(() => store.flush());
  await store.flush();
}

/** qemu-img check's verdict: exit code and the number of leaked clusters it reports. */
async function qemuCheck(file: string): Promise<{ code: number; leaks: number; corruptions: number }> {
  const r = await run('qemu-img', ['check', '--output=json', file]);
  const j = JSON.parse(r.stdout) as { 'leaks'?: number; 'corruptions'?: number };
  return { code: r.code, leaks: j.leaks ?? 0, corruptions: j.corruptions ?? 0 };
}

test('allocation never hands out cluster 0 and appends after the used clusters', async () => {
  // A minimal v2 layout by hand: header at 0, table at 512, block at 1024 counting clusters 0..2.
  const cs = 512;
  const img = new Uint8Array(3 * cs);
  img.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 2], 0);
  img[23] = 9; // cluster_bits
  img[54] = 0x02; // refcount_table_offset = 512
  img[59] = 1; // one table cluster
  img[cs + 6] = 0x04; // table[0] = 1024
  for (let i = 0; i < 3; i++) img[2 * cs + i * 2 + 1] = 1;
  const store = new MemoryStore(img);
  const rc = await openRefcounts(store);
  assert.equal(await rc.allocClusters(2), 3 * cs);
  assert.equal(await rc.allocClusters(1), 5 * cs);
  rc.free(3 * cs, cs);
  assert.equal(await rc.get(3), 1, 'a recorded free keeps the cluster until it is applied');
  assert.equal(await rc.allocClusters(1), 6 * cs);
  await rc.applyPendingFrees();
  assert.equal(await rc.get(3), 0);
  assert.equal(await rc.allocClusters(1), 3 * cs, 'freed space is reused');
});

for (const bits of [1, 16, 64]) {
  test(`growing past the refcount table keeps qemu-img check clean but for our leaks (refcount_bits=${bits})`, needs('qemu-img'), async (t) => {
    const dir = await scratch(t);
    const f = join(dir, 'grow.qcow2');
    // 512-byte clusters: a 64-bit block describes 64 clusters, one table cluster 64 blocks.
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=512,refcount_bits=${bits}`, f, '64M']);
    const store = await FileStore.open(f);
    const rc = await openRefcounts(store);
    const oldTable = rc.tableOffset;
    let allocated = 0;
    for (let i = 0; i < 600; i++) {
      await rc.allocClusters(1 + (i % 13));
      allocated += 1 + (i % 13);
    }
    const fileEnd = rc.end * 512;
    await store.truncate(fileEnd);
    await writeBack(rc, store);
    await store.close();
    if (bits === 64) assert.notEqual(rc.tableOffset, oldTable, 'the table moved');
    const r = await qemuCheck(f);
    assert.equal(r.corruptions, 0);
    assert.equal(r.leaks, allocated, 'exactly the clusters we allocated (and nothing referenced them) leak');
    assert.equal(r.code, 3);
  });
}

test('compressed byte allocation packs clusters and counts every host cluster touched', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const f = join(dir, 'bytes.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', f, '1M']);
  const store = await FileStore.open(f);
  const rc = await openRefcounts(store);
  const a = await rc.allocBytes(3000);
  const b = await rc.allocBytes(3000); // crosses into the next host cluster
  assert.equal(b, a + 3000);
  assert.equal(await rc.get(a / 4096), 2);
  assert.equal(await rc.get(a / 4096 + 1), 1);
  rc.free(a, 3000);
  rc.free(b, 3000);
  await rc.applyPendingFrees();
  assert.equal(await rc.get(a / 4096), 0);
  assert.equal(await rc.get(a / 4096 + 1), 0);
  await writeBack(rc, store);
  await store.close();
  assert.deepEqual(await qemuCheck(f), { code: 0, leaks: 0, corruptions: 0 });
});
