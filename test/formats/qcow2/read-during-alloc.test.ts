/**
 * Reads racing allocating writes. An allocating write sets its new clusters' L2 entries in memory
 * before its data (and the copy-on-write of the rest of the cluster) has landed; the on-disk order
 * is right (every L2 write-back waits for the writes in flight), but a read through the same device
 * must not see the new mapping early: it would read the fresh host cluster before it is written,
 * a hole (zeros) or, for a cluster freed and reused, another guest offset's old bytes. QEMU's read
 * either sees the old mapping (backing data, zeros) or the new data once it has landed.
 *
 * The store here holds every data write carrying HELD until the test releases it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { checkQcow2 } from '#src/formats/qcow2/check.js';
import { RawDevice } from '#src/formats/raw/raw.js';
import { withCopyOnRead } from '#src/chain/copy-on-read.js';
import { Gate } from '../../support/gate.js';

const KiB = 1024;
const HELD = 0xab;

/** A memory store whose writes carrying HELD wait for `release()`, and whose reads can be held. */
class HeldStore extends MemoryStore {
  private gate = new Gate();
  private readGate: Gate | undefined;

  constructor() {
    super(undefined, { name: 'held.qcow2' });
  }

  /** Resolves when the first held write has reached the store. */
  get reached(): Promise<void> {
    return this.gate.reached;
  }

  /** A new gate for the next held write. */
  arm(): void {
    this.gate = new Gate();
  }

  release(): void {
    this.gate.open();
  }

  /** Resolves when the first read held by holdReads() has reached the store. */
  get readReached(): Promise<void> {
    return this.readGate!.reached;
  }

  /** Hold every read from now on until releaseReads(). */
  holdReads(): void {
    this.readGate = new Gate();
  }

  releaseReads(): void {
    const gate = this.readGate;
    this.readGate = undefined;
    gate?.open();
  }

  override async read(offset: number, into: Uint8Array): Promise<number> {
    const gate = this.readGate;
    if (gate) await gate.pass();
    return super.read(offset, into);
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    if (data.includes(HELD)) await this.gate.pass();
    return super.write(offset, data);
  }
}

const filled = (n: number, v: number) => new Uint8Array(n).fill(v);

async function readBack(dev: Qcow2Device, offset: number, length: number): Promise<Uint8Array> {
  const into = new Uint8Array(length);
  await dev.read(offset, into);
  return into;
}

/** A raw backing image of `size` bytes, every byte `fill`. */
function rawBacking(size: number, fill: number): RawDevice {
  return new RawDevice(new MemoryStore(new Uint8Array(size).fill(fill), { name: 'base.raw' }), size, true);
}

async function overlay(cluster: number, extra: Record<string, string> = {}): Promise<{ store: HeldStore; dev: Qcow2Device }> {
  const store = new HeldStore();
  const size = 4096 * KiB;
  await createQcow2(store, { size, backingFile: 'base.raw', backingFormat: 'raw', options: { cluster_size: String(cluster), ...extra } });
  const dev = await Qcow2Device.open(store, { openBacking: async () => rawBacking(size, 0xcc) });
  return { store, dev };
}

async function plain(cluster: number, extra: Record<string, string> = {}): Promise<{ store: HeldStore; dev: Qcow2Device }> {
  const store = new HeldStore();
  await createQcow2(store, { size: 4096 * KiB, options: { cluster_size: String(cluster), ...extra } });
  const dev = await Qcow2Device.open(store);
  return { store, dev };
}

/** Let every request started so far run as far as it can. */
async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
}

/**
 * Start `write` (its data write is held), then `read` while it is held; the read's result, and
 * whether the read finished while the write was still held.
 */
async function raced(store: HeldStore, write: () => Promise<void>, read: () => Promise<Uint8Array>): Promise<Uint8Array> {
  const w = write();
  await store.reached;
  const r = read();
  await settle();
  store.release();
  await w;
  return r;
}

function allOf(bytes: Uint8Array, v: number): boolean {
  return bytes.every((b) => b === v);
}

async function assertClean(store: MemoryStore): Promise<void> {
  const r = await checkQcow2(new MemoryStore(store.bytes()));
  assert.equal(r.corruptions, 0, r.messages.join('; '));
  assert.equal(r.leaks, 0, r.messages.join('; '));
}

test('a read of other bytes of a cluster being allocated (partial write over a backing file) reads the backing data', async () => {
  const { store, dev } = await overlay(64 * KiB);
  const got = await raced(store, () => dev.write(16 * KiB, filled(4 * KiB, HELD)), () => readBack(dev, 40 * KiB, 4 * KiB));
  assert.ok(allOf(got, 0xcc), `read ${got[0]} instead of the backing file's 0xcc`);
  const back = await readBack(dev, 0, 64 * KiB);
  assert.ok(allOf(back.subarray(16 * KiB, 20 * KiB), HELD) && allOf(back.subarray(0, 16 * KiB), 0xcc) && allOf(back.subarray(20 * KiB), 0xcc));
  await dev.close();
  await assertClean(store);
});

test('a read of a whole cluster being allocated (fast path) over a backing file reads old or new data, never zeros', async () => {
  const { store, dev } = await overlay(64 * KiB);
  await dev.write(0, filled(64 * KiB, 1)); // the table exists and is cached
  const got = await raced(store, () => dev.write(128 * KiB, filled(128 * KiB, HELD)), () => readBack(dev, 160 * KiB, 4 * KiB));
  assert.ok(allOf(got, 0xcc) || allOf(got, HELD), `read ${got[0]}`);
  await dev.close();
  await assertClean(store);
});

test('a read racing the allocation of a reused cluster never returns the bytes the cluster held for another offset', async () => {
  const cluster = 64 * KiB;
  const { store, dev } = await plain(cluster);
  await dev.write(0, filled(cluster, 1));
  await dev.write(cluster, filled(cluster, 0x5a)); // pattern A at guest cluster 1
  await dev.discard(cluster, cluster);
  await dev.flush(); // the freed cluster is reusable now
  const got = await raced(store, () => dev.write(8 * cluster, filled(cluster, HELD)), () => readBack(dev, 8 * cluster, 4 * KiB));
  assert.ok(!got.includes(0x5a), 'the read returned the discarded bytes of another guest offset');
  assert.ok(allOf(got, 0) || allOf(got, HELD), `read ${got[0]}`);
  await dev.close();
  await assertClean(store);
});

test('a read racing a whole-cluster overwrite of a compressed cluster (general path) into a reused cluster reads old or new data', async () => {
  const cluster = 64 * KiB;
  const { store, dev } = await plain(cluster);
  await dev.write(0, filled(cluster, 1));
  await dev.writeCompressed(4 * cluster, filled(cluster, 0x11)); // old data at guest cluster 4
  await dev.write(cluster, filled(cluster, 0x5a)); // pattern A at guest cluster 1
  await dev.discard(cluster, cluster);
  await dev.flush();
  // Not a fresh run (the entry is a compressed one): writeInTable links the new cluster while
  // its data write is held.
  const got = await raced(store, () => dev.write(4 * cluster, filled(cluster, HELD)), () => readBack(dev, 4 * cluster + 8 * KiB, 4 * KiB));
  assert.ok(!got.includes(0x5a), 'the read returned the discarded bytes of another guest offset');
  assert.ok(allOf(got, 0x11) || allOf(got, HELD), `read ${got[0]}`);
  assert.ok(allOf(await readBack(dev, 4 * cluster, cluster), HELD));
  await dev.close();
  await assertClean(store);
});

test('a read of a cluster whose allocation spans two L2 slices (general path) waits for the data', async () => {
  const cluster = KiB; // 128 entries a table: the write spans two tables
  const { store, dev } = await overlay(cluster);
  const got = await raced(store, () => dev.write(120 * KiB, filled(16 * KiB, HELD)), () => readBack(dev, 126 * KiB, 4 * KiB));
  assert.ok(allOf(got, 0xcc) || allOf(got, HELD), `read ${got[0]}`);
  await dev.close();
  await assertClean(store);
});

test('extended L2: a read of other subclusters of a cluster being allocated over a backing file reads the backing data', async () => {
  const { store, dev } = await overlay(64 * KiB, { extended_l2: 'on' });
  const got = await raced(store, () => dev.write(16 * KiB, filled(4 * KiB, HELD)), () => readBack(dev, 40 * KiB, 4 * KiB));
  assert.ok(allOf(got, 0xcc), `read ${got[0]} instead of the backing file's 0xcc`);
  const same = await raced(store, () => dev.write(48 * KiB, filled(2 * KiB, HELD)), () => readBack(dev, 48 * KiB, 4 * KiB));
  assert.ok(allOf(same.subarray(2 * KiB), 0xcc), 'the rest of the subcluster reads the backing data');
  await dev.close();
  await assertClean(store);
});

test('external data file: a read racing the allocation of a discarded cluster does not return its discarded bytes', async () => {
  const cluster = 64 * KiB;
  const store = new HeldStore();
  const data = new HeldStore();
  await createQcow2(store, { size: 4096 * KiB, options: { cluster_size: String(cluster), data_file: 'data.raw' }, openFile: async () => data });
  const dev = await Qcow2Device.open(store, { openDataFile: async () => data });
  await dev.write(2 * cluster, filled(cluster, 0x5a));
  await dev.discard(2 * cluster, cluster);
  assert.ok(allOf(await readBack(dev, 2 * cluster, cluster), 0), 'a discarded cluster reads as zeros');
  const got = await raced(data, () => dev.write(2 * cluster, filled(cluster, HELD)), () => readBack(dev, 2 * cluster, 4 * KiB));
  assert.ok(allOf(got, 0) || allOf(got, HELD), `read ${got[0]}`);
  await dev.close();
});

test('a read whose mapping suspends (a table load) while a write links clusters of its range reads old or new data', async () => {
  const cluster = KiB; // 128 entries a table: guest tables of 128 KiB
  const { store, dev: first } = await overlay(cluster);
  await first.write(0, filled(cluster, 1));
  await first.write(128 * KiB, filled(cluster, 2)); // both tables exist
  await first.close();
  const dev = await Qcow2Device.open(store, { openBacking: async () => rawBacking(4096 * KiB, 0xcc) });
  await readBack(dev, 128 * KiB, cluster); // the second table is cached, the first is not
  await dev.write(132 * KiB, filled(cluster, 3)); // and the allocator's block too
  store.holdReads();
  // A read across both tables: mapping it loads the first table (held) before the second.
  const reading = readBack(dev, 120 * KiB, 16 * KiB);
  await store.readReached;
  // A fresh cluster in the cached table, linked at once, its data held.
  const writing = dev.write(130 * KiB, filled(cluster, HELD));
  await store.reached;
  store.releaseReads();
  await settle();
  store.release();
  await writing;
  const got = (await reading).subarray(10 * KiB, 11 * KiB);
  assert.ok(allOf(got, 0xcc) || allOf(got, HELD), `read ${got[0]} where the write was in flight`);
  await dev.close();
  await assertClean(store);
});

test('copy-on-read filter: a plain read racing a guest write allocating its cluster reads old or new data', async () => {
  const { store, dev: top } = await overlay(64 * KiB);
  await top.write(0, filled(64 * KiB, 1)); // the table exists and is cached
  const dev = withCopyOnRead(top);
  // The filter's lock covers the write, but a read whose clusters all look allocated (the new
  // entry is set before the data lands) takes the plain path, outside the lock.
  const got = await raced(store, () => dev.write(128 * KiB, filled(64 * KiB, HELD)), () => {
    const into = new Uint8Array(4 * KiB);
    return dev.read(130 * KiB, into).then(() => into);
  });
  assert.ok(allOf(got, 0xcc) || allOf(got, HELD), `read ${got[0]}`);
  await dev.close();
});
