/**
 * Requests that fail while the writer allocates or writes metadata, as blkdebug's inject-error
 * fails them (once, at the first request after a driver event), without blkdebug in between: the
 * store here hears the events the driver tells (ByteStore.debugEvent). Each failure must fail the
 * request that met it, leave an image that checks without corruption, and give back what nothing
 * names: a compressed cluster's room whose data write failed, an L2 table whose write failed, an
 * L1 table that never got written. The write-backs of a grown refcount table fail at each of
 * their steps and succeed when run again.
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
const MiB = 1024 * KiB;

type Kind = 'read' | 'write' | 'flush';

/**
 * A memory store that fails the first request of the chosen kinds after `event` is told, once
 * (blkdebug's once=on, immediately=off), and records what it is asked while `log` is on.
 */
class EventFailingStore extends MemoryStore {
  private armedBy: string | undefined;
  private kinds: readonly Kind[] = ['read', 'write', 'flush'];
  private armed = false;
  failed = 0;
  log: string[] | undefined;

  failAfter(event: string, kinds: readonly Kind[] = ['read', 'write', 'flush']): void {
    this.armedBy = event;
    this.kinds = kinds;
    this.armed = false;
  }

  debugEvent(event: string): void {
    this.log?.push(`event ${event}`);
    if (event === this.armedBy) this.armed = true;
  }

  private check(kind: Kind): void {
    if (!this.armed || !this.kinds.includes(kind)) return;
    this.armed = false;
    this.armedBy = undefined;
    this.failed++;
    throw Object.assign(new Error('ENOSPC: injected failure'), { code: 'ENOSPC' });
  }

  override async read(offset: number, into: Uint8Array): Promise<number> {
    this.check('read');
    return super.read(offset, into);
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    this.log?.push(`write ${offset} ${data.length}`);
    this.check('write');
    return super.write(offset, data);
  }

  override async flush(): Promise<void> {
    this.log?.push('flush');
    this.check('flush');
    return super.flush();
  }
}

async function freshImage(cluster: number, size = 64 * MiB): Promise<EventFailingStore> {
  const store = new EventFailingStore(undefined, { name: 'failing.qcow2' });
  await createQcow2(store, { size, options: { cluster_size: String(cluster) } });
  return store;
}

/** No corruption (ours and qemu-img's check); no leak either unless `leaks` allows them. */
async function assertConsistent(t: Parameters<typeof scratch>[0], store: MemoryStore, leaks = false): Promise<void> {
  const ours = await checkQcow2(new MemoryStore(store.bytes()));
  assert.equal(ours.corruptions, 0, ours.messages.join('; '));
  if (!leaks) assert.equal(ours.leaks, 0, ours.messages.join('; '));
  if (!hasTool('qemu-img')) return;
  const file = join(await scratch(t), 'after.qcow2');
  await writeFile(file, store.bytes());
  const r = await run('qemu-img', ['check', file]);
  assert.ok(r.code === 0 || (leaks && r.code === 3), r.stdout + r.stderr);
}

async function readBack(read: (pos: number, into: Uint8Array) => Promise<void>, offset: number, length: number): Promise<Uint8Array> {
  const into = new Uint8Array(length);
  await read(offset, into);
  return into;
}

const filled = (n: number, v: number) => new Uint8Array(n).fill(v);

test('a compressed write whose data write fails names nothing, and its room goes to the next one', async (t) => {
  const cluster = 64 * KiB;
  const store = await freshImage(cluster);
  const dev = await Qcow2Device.open(store);
  store.failAfter('write_compressed');
  await assert.rejects(dev.writeCompressed(0, filled(cluster, 7)), /ENOSPC/);
  assert.equal(store.failed, 1);
  assert.ok((await readBack((o, i) => dev.read(o, i), 0, cluster)).every((b) => b === 0));
  await dev.flush();
  await assertConsistent(t, store);
  // The next compressed cluster takes the bytes the failed one was given: one host cluster.
  await dev.writeCompressed(cluster, filled(cluster, 8));
  await dev.close();
  await assertConsistent(t, store);
  const again = await Qcow2Device.open(store, { readOnly: true });
  assert.ok((await readBack((o, i) => again.read(o, i), cluster, cluster)).every((b) => b === 8));
  assert.equal((await checkQcow2(new MemoryStore(store.bytes()))).allocatedClusters, 1);
  await again.close();
});

test('a failed compressed write into a host cluster shared with earlier compressed data drops only its own reference', async (t) => {
  const cluster = 64 * KiB;
  const store = await freshImage(cluster);
  const dev = await Qcow2Device.open(store);
  await dev.writeCompressed(0, filled(cluster, 5));
  store.failAfter('write_compressed');
  await assert.rejects(dev.writeCompressed(cluster, filled(cluster, 6)), /ENOSPC/);
  await dev.flush();
  await assertConsistent(t, store);
  await dev.writeCompressed(2 * cluster, filled(cluster, 9));
  await dev.close();
  await assertConsistent(t, store);
  const again = await Qcow2Device.open(store, { readOnly: true });
  assert.ok((await readBack((o, i) => again.read(o, i), 0, cluster)).every((b) => b === 5));
  assert.ok((await readBack((o, i) => again.read(o, i), cluster, cluster)).every((b) => b === 0));
  assert.ok((await readBack((o, i) => again.read(o, i), 2 * cluster, cluster)).every((b) => b === 9));
  await again.close();
});

test('a new L2 table whose write fails is given back, and the write then lands', async (t) => {
  const store = await freshImage(KiB);
  const dev = await Qcow2Device.open(store);
  store.failAfter('l2_alloc_write');
  await assert.rejects(dev.write(0, filled(4 * KiB, 1)), /ENOSPC/);
  await dev.flush();
  await assertConsistent(t, store);
  await dev.write(0, filled(4 * KiB, 2));
  await dev.close();
  await assertConsistent(t, store);
});

test('an L1 growth whose table write fails gives the table back; the VM state write then lands', async (t) => {
  const store = await freshImage(KiB, 1024 * MiB);
  const dev = await Qcow2Device.open(store);
  store.failAfter('l1_grow_write_table');
  await assert.rejects(dev.writeVmState(0, filled(64 * KiB, 3)), /ENOSPC/);
  await dev.flush();
  await assertConsistent(t, store);
  await dev.writeVmState(0, filled(64 * KiB, 4));
  assert.ok((await readBack((o, i) => dev.readVmState(o, i), 0, 64 * KiB)).every((b) => b === 4));
  await dev.close();
  await assertConsistent(t, store);
});

test('an L1 growth whose header write fails keeps the old table active (its new one leaks at most)', async (t) => {
  const size = 1024 * MiB;
  const store = await freshImage(KiB, size);
  const dev = await Qcow2Device.open(store);
  store.failAfter('l1_grow_activate_table');
  await assert.rejects(dev.writeVmState(0, filled(64 * KiB, 3)), /ENOSPC/);
  // The last L2 table of the disk: its L1 entry is the old table's last, written where it is.
  await dev.write(size - 4 * KiB, filled(4 * KiB, 5));
  await dev.flush();
  await assertConsistent(t, store, true);
  await dev.writeVmState(0, filled(64 * KiB, 4));
  await dev.close();
  await assertConsistent(t, store, true);
  const again = await Qcow2Device.open(store, { readOnly: true });
  assert.ok((await readBack((o, i) => again.read(o, i), size - 4 * KiB, 4 * KiB)).every((b) => b === 5));
  assert.ok((await readBack((o, i) => again.readVmState(o, i), 0, 64 * KiB)).every((b) => b === 4));
  await again.close();
});

// 512-byte clusters: a refcount block describes 128 KiB and the first table 64 blocks (8 MiB), so
// a 12 MiB write makes new blocks, some beyond the table's reach, and moves the table.
for (const event of ['refblock_alloc_write', 'refblock_alloc_write_blocks', 'refblock_alloc_hookup', 'refblock_alloc_write_table', 'refblock_alloc_switch_table']) {
  test(`a refcount table growth whose write-back fails at ${event} fails the flush, and the next flush completes it`, async (t) => {
    const store = await freshImage(512);
    const dev = await Qcow2Device.open(store);
    await dev.write(0, filled(12 * MiB, 6));
    store.failAfter(event);
    await assert.rejects(dev.flush(), /ENOSPC/);
    assert.equal(store.failed, 1, `${event} was told and failed the request after it`);
    await dev.flush();
    await dev.close();
    await assertConsistent(t, store);
    const again = await Qcow2Device.open(store, { readOnly: true });
    assert.ok((await readBack((o, i) => again.read(o, i), 0, 12 * MiB)).every((b) => b === 6));
    await again.close();
  });
}

test('new refcount blocks whose barrier failed get it again before a table entry names them', async () => {
  const store = await freshImage(512);
  const dev = await Qcow2Device.open(store);
  await dev.write(0, filled(2 * MiB, 6)); // new blocks within the first table's reach
  store.failAfter('refblock_alloc_write', ['flush']);
  await assert.rejects(dev.flush(), /ENOSPC/);
  store.log = [];
  await dev.flush();
  const log = store.log;
  store.log = undefined;
  const hookup = log.indexOf('event refblock_alloc_hookup');
  assert.ok(hookup > 0, log.join('\n'));
  assert.ok(log.slice(0, hookup).includes('flush'), `no barrier before the table entries:\n${log.join('\n')}`);
  await dev.close();
});
