/**
 * A guest data write that fails (EIO or ENOSPC from the disk) must leave an image that checks
 * clean: the L2 entries of the failed write never reach the file, the clusters allocated for it
 * are given back, and what the range read before it still reads. The store here fails the data
 * writes that carry a chosen byte (guest data only: no metadata write contains it), with no
 * blkdebug in between, and every path of the writer is driven into it: the synchronous fast path
 * (fresh clusters in a cached table), the deferred general path over several tables, a partial
 * cluster's copy-on-write, a preallocated zero cluster overwritten, and concurrent writes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { checkQcow2 } from '#src/formats/qcow2/check.js';
import { hasTool, run, scratch } from '../../support/qemu.js';

const KiB = 1024;
/** The byte that marks a write as one to fail. */
const POISON = 0xab;

/** A memory store whose writes carrying POISON fail while `failing` is on, as a full disk would. */
class FailingStore extends MemoryStore {
  failing = false;
  failed = 0;
  /** The errno-like code of the failure. */
  code = 'ENOSPC';

  override async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.failing && data.includes(POISON)) {
      this.failed++;
      throw Object.assign(new Error(`${this.code}: write failed`), { code: this.code });
    }
    return super.write(offset, data);
  }
}

async function freshImage(cluster: number, size = 64 * 1024 * KiB): Promise<FailingStore> {
  const store = new FailingStore(undefined, { name: 'failing.qcow2' });
  await createQcow2(store, { size, options: { cluster_size: String(cluster) } });
  return store;
}

/** Our check and, when it is installed, qemu-img's: no corruption, no leak. */
async function assertClean(t: Parameters<typeof scratch>[0], store: FailingStore): Promise<void> {
  const ours = await checkQcow2(new MemoryStore(store.bytes()));
  assert.equal(ours.corruptions, 0, ours.messages.join('; '));
  assert.equal(ours.leaks, 0, ours.messages.join('; '));
  if (!hasTool('qemu-img')) return;
  const file = join(await scratch(t), 'after.qcow2');
  await writeFile(file, store.bytes());
  const r = await run('qemu-img', ['check', file]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
}

async function readBack(dev: Qcow2Device, offset: number, length: number): Promise<Uint8Array> {
  const into = new Uint8Array(length);
  await dev.read(offset, into);
  return into;
}

const filled = (n: number, v: number) => new Uint8Array(n).fill(v);

/** `write`, made while the store refuses guest data writes, fails with the store's ENOSPC. */
async function failsWithNoSpace(store: FailingStore, write: () => Promise<void>): Promise<void> {
  store.failing = true;
  try {
    await assert.rejects(write(), /ENOSPC/);
  } finally {
    store.failing = false;
  }
}

/** The failed range maps as before (unallocated, or a zero cluster), and the image as flushed now checks clean. */
async function assertUndone(t: Parameters<typeof scratch>[0], dev: Qcow2Device, store: FailingStore, offset: number, length: number): Promise<void> {
  for (const e of await dev.blockStatus(offset, length)) assert.ok(!e.data, `${e.offset}+${e.length} still maps to data`);
  assert.ok((await readBack(dev, offset, length)).every((b) => b === 0), 'the failed range reads as before');
  await dev.flush();
  await assertClean(t, store);
}

test('a failed write of fresh clusters in a cached table (the fast path) leaves no entry and no leak', async (t) => {
  const cluster = 4 * KiB;
  const store = await freshImage(cluster);
  const dev = await Qcow2Device.open(store);
  // The table exists and is cached: the next write of fresh clusters there needs no I/O first.
  await dev.write(0, filled(cluster, 1));
  await failsWithNoSpace(store, () => dev.write(64 * KiB, filled(128 * KiB, POISON)));
  assert.ok(store.failed > 0);
  await assertUndone(t, dev, store, 64 * KiB, 128 * KiB);
  // The image goes on: a later write there lands, and the first cluster kept its data.
  await dev.write(256 * KiB, filled(cluster, 2));
  await dev.close();
  await assertClean(t, store);
  const again = await Qcow2Device.open(store, { readOnly: true });
  assert.ok((await readBack(again, 0, cluster)).every((b) => b === 1));
  assert.ok((await readBack(again, 64 * KiB, 128 * KiB)).every((b) => b === 0));
  assert.ok((await readBack(again, 256 * KiB, cluster)).every((b) => b === 2));
  await again.close();
});

test('a failed write over several L2 tables (the general path, data written after linking) is undone', async (t) => {
  const cluster = KiB; // 128 entries a table: 1 MiB spans 8 tables
  const store = await freshImage(cluster);
  const dev = await Qcow2Device.open(store);
  await failsWithNoSpace(store, () => dev.write(0, filled(1024 * KiB, POISON)));
  await assertUndone(t, dev, store, 0, 1024 * KiB);
  // As iotest 026's "temporary failure": the same write again succeeds, and nothing leaks.
  await dev.write(0, filled(1024 * KiB, 3));
  await dev.close();
  await assertClean(t, store);
});

test('a failed partial-cluster write (copy-on-write into a new cluster) frees the cluster', async (t) => {
  const cluster = 64 * KiB;
  const store = await freshImage(cluster);
  const dev = await Qcow2Device.open(store);
  await dev.write(0, filled(cluster, 1));
  await failsWithNoSpace(store, () => dev.write(cluster + 512, filled(KiB, POISON)));
  await assertUndone(t, dev, store, cluster, cluster);
  // A later allocation puts the freed cluster inside the file, where a count left on it would leak.
  await dev.write(3 * cluster, filled(cluster, 2));
  await dev.close();
  await assertClean(t, store);
});

test('a failed overwrite of a preallocated zero cluster keeps it a zero cluster and does not free it', async (t) => {
  const cluster = 64 * KiB;
  const store = await freshImage(cluster);
  const dev = await Qcow2Device.open(store);
  await dev.write(0, filled(cluster, 1));
  await dev.writeZeroes(0, cluster, { mayUnmap: false });
  await failsWithNoSpace(store, () => dev.write(0, filled(cluster, POISON)));
  await assertUndone(t, dev, store, 0, cluster);
  await dev.close();
  await assertClean(t, store);
});

test('concurrent writes with one failing: the others land, the failed one is undone', async (t) => {
  const cluster = 4 * KiB;
  const store = await freshImage(cluster);
  const dev = await Qcow2Device.open(store);
  await dev.write(0, filled(cluster, 1));
  store.failing = true;
  const writes = [];
  for (let i = 1; i <= 32; i++) writes.push(dev.write(i * 16 * KiB, filled(16 * KiB, i === 17 ? POISON : i)));
  const results = await Promise.allSettled(writes);
  store.failing = false;
  assert.deepEqual(
    results.map((r, i) => (r.status === 'rejected' ? i + 1 : 0)).filter((x) => x !== 0),
    [17],
  );
  await assertUndone(t, dev, store, 17 * 16 * KiB, 16 * KiB);
  for (let i = 1; i <= 32; i++) {
    const back = await readBack(dev, i * 16 * KiB, 16 * KiB);
    assert.ok(back.every((b) => b === (i === 17 ? 0 : i)), `write ${i}`);
  }
  await dev.close();
  await assertClean(t, store);
});
