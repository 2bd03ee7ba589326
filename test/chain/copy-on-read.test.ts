/**
 * Copy-on-read against the requests that change the image while a copy reads its backing data:
 * the copy reads old bytes from the backing chain, then writes them into the image; a request
 * that changed the same clusters in between must not be overwritten by them (QEMU serialises a
 * copy-on-read against every overlapping write, compressed ones included).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { RawDevice } from '#src/formats/raw/raw.js';
import { withCopyOnRead } from '#src/chain/copy-on-read.js';
import { Gate } from '../support/gate.js';

const KiB = 1024;
const SIZE = 1024 * KiB;
const CLUSTER = 64 * KiB;

/** A memory store whose reads wait, once `hold()` was called, until `release()`. */
class HeldReads extends MemoryStore {
  private gate: Gate | undefined;

  /** Resolves when the first held read has reached the store. */
  get reached(): Promise<void> {
    return this.gate!.reached;
  }

  hold(): void {
    this.gate = new Gate();
  }

  release(): void {
    this.gate!.open();
  }

  override async read(offset: number, into: Uint8Array): Promise<number> {
    if (this.gate) await this.gate.pass();
    return super.read(offset, into);
  }
}

async function chain(): Promise<{ top: Qcow2Device; base: HeldReads; store: MemoryStore }> {
  const base = new HeldReads(new Uint8Array(SIZE).fill(0xcc), { name: 'base.raw' });
  const store = new MemoryStore(undefined, { name: 'top.qcow2' });
  await createQcow2(store, { size: SIZE, backingFile: 'base.raw', backingFormat: 'raw' });
  const top = await Qcow2Device.open(store, { openBacking: async () => new RawDevice(base, SIZE, true) });
  return { top, base, store };
}

/** Bytes that compress well, so the write is stored as a compressed cluster. */
const pattern = (v: number) => new Uint8Array(CLUSTER).fill(v);

test('a compressed write made while a copy-on-read reads the backing data is not overwritten by the copy', async () => {
  const { top, base } = await chain();
  const dev = withCopyOnRead(top);
  base.hold();
  const reading = dev.read(0, new Uint8Array(4 * KiB));
  await base.reached;
  const compressing = dev.writeCompressed!(0, pattern(0x5a));
  // Give the compressed write every chance to land before the copy's backing read does (its
  // compression runs on libuv's pool: a few event-loop turns are not enough).
  await Promise.race([compressing.catch(() => undefined), new Promise((r) => setTimeout(r, 500))]);
  base.release();
  await Promise.all([reading, compressing]);
  const back = new Uint8Array(CLUSTER);
  await dev.read(0, back);
  assert.ok(back.every((b) => b === 0x5a), 'the compressed write reads back');
  await dev.close();
});

/** A memory store whose writes of a whole cluster of `fill` wait, once `hold()` was called, until `release()`. */
class HeldWrites extends MemoryStore {
  private gate: Gate | undefined;
  private fill = -1;

  /** Resolves when the first held write has reached the store. */
  get reached(): Promise<void> {
    return this.gate!.reached;
  }

  hold(fill: number): void {
    this.fill = fill;
    this.gate = new Gate();
  }

  release(): void {
    this.gate!.open();
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.gate && data.length >= CLUSTER && data[0] === this.fill) await this.gate.pass();
    return super.write(offset, data);
  }
}

test('a read of clusters another read is copying waits for the copy: it reads the backing data, not the unwritten cluster', async () => {
  const base = new MemoryStore(new Uint8Array(SIZE).fill(0xcc), { name: 'base.raw' });
  const store = new HeldWrites(undefined, { name: 'top.qcow2' });
  await createQcow2(store, { size: SIZE, backingFile: 'base.raw', backingFormat: 'raw' });
  const top = await Qcow2Device.open(store, { openBacking: async () => new RawDevice(base, SIZE, true) });
  await top.write(0, pattern(1)); // the L2 table exists: the copy's clusters are linked before their data lands
  const dev = withCopyOnRead(top);
  store.hold(0xcc);
  const first = dev.read(CLUSTER, new Uint8Array(512));
  await store.reached; // the copy's data write is held
  const second = new Uint8Array(512);
  const reading = dev.read(CLUSTER + 1024, second);
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
  store.release();
  await Promise.all([first, reading]);
  assert.ok(second.every((b) => b === 0xcc), `the second read sees the backing data (got 0x${second[0]!.toString(16)})`);
  await dev.close();
});
