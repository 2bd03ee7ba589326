/**
 * A write into a cluster whose allocating write is still in flight must not be lost when that
 * allocating write then fails. The allocation's L2 entries are set in memory before its data
 * lands (the data write finishes outside the writer's lock), so a second request touching the
 * cluster sees it as allocated; QEMU makes such a request wait for the allocation in flight (its
 * dependency on the l2meta), and so must we: otherwise the second request writes in place, is
 * told it succeeded, and the failed allocation's undo then unlinks the cluster under it.
 *
 * The store here holds every guest data write carrying POISON until the test releases it, then
 * fails it (a disk that fills up while the request is in flight).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { checkQcow2 } from '#src/formats/qcow2/check.js';
import { RawDevice } from '#src/formats/raw/raw.js';
import { randomBytes } from 'node:crypto';
import { Gate } from '../../support/gate.js';

const KiB = 1024;
const POISON = 0xab;

/** A memory store whose writes carrying POISON wait for `release()`, then fail with ENOSPC. */
class HeldStore extends MemoryStore {
  held = 0;
  private readonly gate = new Gate();
  /** Resolves when the first poisoned write has reached the store. */
  readonly reached = this.gate.reached;

  constructor() {
    super(undefined, { name: 'held.qcow2' });
  }

  release(): void {
    this.gate.open();
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    if (data.includes(POISON)) {
      this.held++;
      await this.gate.pass();
      throw Object.assign(new Error('ENOSPC: write failed'), { code: 'ENOSPC' });
    }
    return super.write(offset, data);
  }
}

async function image(cluster: number): Promise<HeldStore> {
  const store = new HeldStore();
  await createQcow2(store, { size: 64 * 1024 * KiB, options: { cluster_size: String(cluster) } });
  return store;
}

const filled = (n: number, v: number) => new Uint8Array(n).fill(v);

async function readBack(dev: Qcow2Device, offset: number, length: number): Promise<Uint8Array> {
  const into = new Uint8Array(length);
  await dev.read(offset, into);
  return into;
}

async function assertClean(store: HeldStore): Promise<void> {
  const r = await checkQcow2(new MemoryStore(store.bytes()));
  assert.equal(r.corruptions, 0, r.messages.join('; '));
  assert.equal(r.leaks, 0, r.messages.join('; '));
}

/**
 * Start `first` (an allocating write that will fail), wait until its data write is held, start
 * `second` (into one of its clusters), then let the first fail; the second must land.
 */
async function raced(store: HeldStore, first: () => Promise<void>, second: () => Promise<void>): Promise<void> {
  const a = first();
  a.catch(() => undefined);
  await store.reached;
  const b = second();
  let bDone = false;
  void b.then(() => (bDone = true), () => undefined);
  // Give the second request every chance to finish before the first is released.
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
  store.release();
  await assert.rejects(a, /ENOSPC/);
  await b;
  assert.ok(bDone);
}

test('a write into fresh clusters still being written (fast path) waits for them; their failure does not lose it', async () => {
  const cluster = 4 * KiB;
  const store = await image(cluster);
  const dev = await Qcow2Device.open(store);
  await dev.write(0, filled(cluster, 1)); // the table exists and is cached
  await raced(
    store,
    () => dev.write(64 * KiB, filled(16 * KiB, POISON)),
    () => dev.write(68 * KiB, filled(4 * KiB, 2)),
  );
  assert.ok((await readBack(dev, 68 * KiB, 4 * KiB)).every((b) => b === 2), 'the second write reads back');
  assert.ok((await readBack(dev, 64 * KiB, 4 * KiB)).every((b) => b === 0), 'the failed write left nothing');
  assert.ok((await readBack(dev, 72 * KiB, 8 * KiB)).every((b) => b === 0), 'the failed write left nothing');
  await dev.close();
  await assertClean(store);
  const again = await Qcow2Device.open(store, { readOnly: true });
  assert.ok((await readBack(again, 68 * KiB, 4 * KiB)).every((b) => b === 2), 'the second write is on disk');
  assert.ok((await readBack(again, 0, cluster)).every((b) => b === 1));
  await again.close();
});

test('a partial write into a cluster of a multi-table allocation in flight (general path) is not lost', async () => {
  const cluster = KiB; // 128 entries a table: 256 KiB spans 2 tables
  const store = await image(cluster);
  const dev = await Qcow2Device.open(store);
  await raced(
    store,
    () => dev.write(0, filled(256 * KiB, POISON)),
    () => dev.write(100 * KiB + 512, filled(512, 3)),
  );
  const back = await readBack(dev, 99 * KiB, 3 * KiB);
  assert.ok(back.subarray(KiB + 512, 2 * KiB).every((b) => b === 3), 'the second write reads back');
  assert.ok(back.subarray(0, KiB + 512).every((b) => b === 0) && back.subarray(2 * KiB).every((b) => b === 0), 'the failed write left nothing');
  await dev.close();
  await assertClean(store);
});

test('writes to other clusters do not wait for an allocation in flight', async () => {
  const cluster = 4 * KiB;
  const store = await image(cluster);
  const dev = await Qcow2Device.open(store);
  await dev.write(0, filled(cluster, 1));
  const a = dev.write(64 * KiB, filled(16 * KiB, POISON));
  a.catch(() => undefined);
  await store.reached;
  // In place and fresh, both beside the held one: they finish while it is still held.
  await dev.write(0, filled(cluster, 4));
  await dev.write(128 * KiB, filled(cluster, 5));
  store.release();
  await assert.rejects(a, /ENOSPC/);
  assert.ok((await readBack(dev, 0, cluster)).every((b) => b === 4));
  assert.ok((await readBack(dev, 128 * KiB, cluster)).every((b) => b === 5));
  await dev.close();
  await assertClean(store);
});

test('a write into a new cluster of a request that also writes in place (its late runs, linked before they land) is not lost', async () => {
  const cluster = 4 * KiB;
  const store = await image(cluster);
  const dev = await Qcow2Device.open(store);
  await dev.write(64 * KiB, filled(cluster, 1));
  // New, in place, new: not a fresh run, so each cluster is a run of the general path whose
  // entries are set while its data write is still held.
  await raced(
    store,
    () => dev.write(60 * KiB, filled(3 * cluster, POISON)),
    () => dev.write(68 * KiB + 512, filled(512, 3)),
  );
  const back = await readBack(dev, 68 * KiB, cluster);
  assert.ok(back.subarray(512, KiB).every((b) => b === 3), 'the second write reads back');
  assert.ok(back.subarray(0, 512).every((b) => b === 0) && back.subarray(KiB).every((b) => b === 0), 'the failed write left nothing');
  assert.ok((await readBack(dev, 60 * KiB, cluster)).every((b) => b === 0));
  await dev.close();
  await assertClean(store);
});

/** A raw backing image of `size` bytes, every byte `fill`. */
async function rawBacking(size: number, fill: number): Promise<RawDevice> {
  const store = new MemoryStore(new Uint8Array(size).fill(fill), { name: 'base.raw' });
  return new RawDevice(store, size, true);
}

test('a partial zero write into a cluster whose allocation is in flight waits for it; its failure does not bring the backing data back', async () => {
  const cluster = 4 * KiB;
  const store = new HeldStore();
  await createQcow2(store, { size: 1024 * KiB, backingFile: 'base.raw', backingFormat: 'raw', options: { cluster_size: String(cluster) } });
  const dev = await Qcow2Device.open(store, { openBacking: () => rawBacking(1024 * KiB, 0xcc) });
  await dev.write(0, filled(cluster, 1)); // the table exists and is cached
  // The zero write covers part of a cluster that holds data: qcow2 writes it as zero bytes.
  await raced(
    store,
    () => dev.write(64 * KiB, filled(16 * KiB, POISON)),
    () => dev.writeZeroes(68 * KiB + 512, 512),
  );
  const back = await readBack(dev, 68 * KiB, cluster);
  assert.ok(back.subarray(512, KiB).every((b) => b === 0), 'the zero write reads back as zeros');
  assert.ok(back.subarray(0, 512).every((b) => b === 0xcc) && back.subarray(KiB).every((b) => b === 0xcc), 'the rest reads through to the backing file');
  await dev.close();
  await assertClean(store);
});

test('a compressed write whose cluster does not shrink, into a cluster whose allocation is in flight, is not lost', async () => {
  const cluster = 4 * KiB;
  const store = await image(cluster);
  const dev = await Qcow2Device.open(store);
  await dev.write(0, filled(cluster, 1));
  // Bytes that do not compress (stored as a normal cluster), none of them POISON.
  const noise = new Uint8Array(randomBytes(cluster)).map((b) => (b === POISON ? 0 : b));
  await raced(
    store,
    () => dev.write(64 * KiB, filled(16 * KiB, POISON)),
    () => dev.writeCompressed(68 * KiB, noise),
  );
  assert.deepEqual(await readBack(dev, 68 * KiB, cluster), noise, 'the compressed write reads back');
  await dev.close();
  await assertClean(store);
  const again = await Qcow2Device.open(store, { readOnly: true });
  assert.deepEqual(await readBack(again, 68 * KiB, cluster), noise, 'and is on disk');
  await again.close();
});
