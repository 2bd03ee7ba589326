import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';
import { FileStore } from '#src/storage/file.node.js';
import { MemoryStore } from '#src/storage/memory.js';
import { decodeHeader } from '#src/formats/qcow2/header.js';
import { Refcounts } from '#src/formats/qcow2/alloc.js';

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

/**
 * A minimal v2 layout by hand, 512-byte clusters: header at 0, refcount table at 512, one refcount
 * block at 1024 counting clusters 0..2 with `counts` (16-bit).
 */
function handMadeImage(counts: readonly [number, number, number] = [1, 1, 1]): MemoryStore {
  const cs = 512;
  const img = new Uint8Array(3 * cs);
  img.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 2], 0);
  img[23] = 9; // cluster_bits
  img[54] = 0x02; // refcount_table_offset = 512
  img[59] = 1; // one table cluster
  img[cs + 6] = 0x04; // table[0] = 1024
  counts.forEach((n, i) => new DataView(img.buffer).setUint16(2 * cs + i * 2, n));
  return new MemoryStore(img);
}

test('allocation never hands out cluster 0 and appends after the used clusters', async () => {
  const cs = 512;
  const store = handMadeImage();
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

test('frees report the clusters they leave unreferenced at once, by reason, and never twice', async () => {
  // The hand-made layout; clusters 3..6 allocated, 4 shared (count 2).
  const cs = 512;
  const rc = await openRefcounts(handMadeImage());
  assert.equal(await rc.allocClusters(4), 3 * cs);
  await rc.update(4 * cs, cs, 1);
  // A request's frees: 3 is left with nothing, 4 keeps the other reference, 5 goes but 'never'
  // passes discards on (a rewrite), 6 goes as 'other', which is off by default.
  rc.free(3 * cs, cs, 'request');
  rc.free(4 * cs, cs, 'request');
  rc.free(5 * cs, cs, 'never');
  rc.free(6 * cs, cs, 'other');
  assert.deepEqual(await rc.takeUnreferenced(), [[3 * cs, cs]]);
  assert.equal(await rc.get(3), 1, 'the count itself waits for the tables');
  assert.deepEqual(await rc.takeUnreferenced(), [], 'nothing is reported twice');
  // The second reference to 4 goes too: now it is left with nothing.
  rc.free(4 * cs, cs, 'request');
  assert.deepEqual(await rc.takeUnreferenced(), [[4 * cs, cs]]);
  await rc.applyPendingFrees();
  assert.deepEqual(rc.freedRuns, [], 'reported ones and those of reasons not passed on are not punched again');
  for (const c of [3, 4, 5, 6]) assert.equal(await rc.get(c), 0);
  // With pass-discard-other on, an 'other' free is punched when applied.
  rc.setDiscardPassthrough({ request: true, snapshot: true, other: true });
  assert.equal(await rc.allocClusters(1), 3 * cs);
  rc.free(3 * cs, cs, 'other');
  await rc.applyPendingFrees();
  assert.deepEqual(rc.freedRuns, [[3 * cs, cs]]);
});

test('a refcount range update that would overflow anywhere changes nothing', async () => {
  // The hand-made layout with clusters 0..2 counted 1, 1 and 3.
  const cs = 512;
  const rc = await openRefcounts(handMadeImage([1, 1, 3]));
  // +65533 fits cluster 1 (65534) but not cluster 2 (65536 > 16-bit maximum).
  await assert.rejects(rc.update(cs, 2 * cs, 0xffff - 2), /Refcount overflow/);
  assert.deepEqual([await rc.get(0), await rc.get(1), await rc.get(2)], [1, 1, 3], 'cluster 1 was not changed before cluster 2 failed');
  await assert.rejects(rc.update(0, 3 * cs, -2), /would drop below zero/);
  assert.deepEqual([await rc.get(0), await rc.get(1), await rc.get(2)], [1, 1, 3]);
  await rc.update(cs, 2 * cs, 1);
  assert.deepEqual([await rc.get(1), await rc.get(2)], [2, 4]);
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

test('refcount blocks stay within the cache budget over a long run of allocations, and the image checks clean', needs('qemu-img'), async (t) => {
  // 512-byte clusters with 16-bit counts: one block per 256 clusters, so 16 MiB of writes touch
  // 128+ blocks; a 16 KiB metadata budget leaves room for 8 (a quarter of it, at least 8).
  const dir = await scratch(t);
  const file = join(dir, 'many-blocks.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', file, '64M']);
  const { openImage } = await import('#src/node.js');
  const dev = (await openImage(file, { cacheBytes: 16 * 1024 })) as import('#src/formats/qcow2/qcow2.js').Qcow2Device;
  const expected = new Uint8Array(64 * 1024 * 1024);
  let peak = 0;
  try {
    const chunk = 64 * 1024;
    // Forward, then back over every other chunk, then a second pass in a scattered order, so
    // evicted blocks are loaded again (and written again) several times.
    const order: number[] = [];
    for (let i = 0; i < 256; i++) order.push(i);
    for (let i = 255; i >= 0; i -= 2) order.push(i + 256);
    for (let i = 0; i < 128; i++) order.push((i * 37) % 512);
    for (const [k, i] of order.entries()) {
      const data = new Uint8Array(chunk).fill((k % 251) + 1);
      await dev.write(i * chunk, data);
      expected.set(data, i * chunk);
      peak = Math.max(peak, dev.writer!.refcounts.cachedBlocks);
    }
  } finally {
    await dev.close();
  }
  assert.ok(peak <= 12, `at most the budget (8) plus the blocks one request creates; held ${peak}`);
  const check = await qemuCheck(file);
  assert.deepEqual(check, { code: 0, leaks: 0, corruptions: 0 });
  const raw = join(dir, 'expected.raw');
  const { writeFile } = await import('node:fs/promises');
  await writeFile(raw, expected);
  const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', file, raw]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
});

test('dirty refcount blocks beyond the budget are written early, and what they say is right', needs('qemu-img'), async (t) => {
  // Allocations alone (no flush, no table write-back) dirty one block after another: 512-byte
  // clusters, 256 counts per block, 4096 allocations of 32 clusters touch 512 blocks.
  const dir = await scratch(t);
  const file = join(dir, 'spill.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', file, '1G']);
  const store = await FileStore.open(file);
  const head = new Uint8Array(4096);
  await store.read(0, head);
  const h = decodeHeader(head);
  const params = { clusterSize: 512, refcountBits: 16, tableOffset: h.refcountTableOffset, tableClusters: h.refcountTableClusters };
  const rc = await Refcounts.load(store, { ...params, cacheBytes: 8 * 512 });
  const runs: number[] = [];
  let peak = 0;
  for (let i = 0; i < 4096; i++) {
    runs.push(await rc.allocClusters(32));
    peak = Math.max(peak, rc.cachedBlocks);
  }
  assert.ok(peak <= 8 + 2, `held ${peak} blocks for a budget of 8`);
  await writeBack(rc, store);
  await store.close();
  // Read back from disk with a fresh cache (the table has moved: the header says where to):
  // every allocated cluster counts 1, the one after the last 0.
  const again = await FileStore.open(file, { readOnly: true });
  const fresh = await openRefcounts(again);
  for (const off of runs) for (const c of [off / 512, off / 512 + 31]) assert.equal(await fresh.get(c), 1, `cluster ${c}`);
  assert.equal(await fresh.get(runs[runs.length - 1]! / 512 + 32), 0);
  await again.close();
  // Nothing references the clusters (and most lie past the end of the file, never written):
  // qemu-img check sees leaks, and nothing worse.
  const check = await qemuCheck(file);
  assert.equal(check.corruptions, 0);
  assert.equal(check.code, 3);
  assert.ok(check.leaks > 0);
});
