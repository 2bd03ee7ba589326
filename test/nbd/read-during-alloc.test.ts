/**
 * Two NBD clients of one qcow2 export (each client's own requests are ordered by the server,
 * RequestOrder, but two clients' are not): a read by one of a cluster whose allocating write by
 * the other is in flight reads the old data (the backing file's) or the new, never the fresh host
 * cluster before its data landed (zeros, or another guest offset's old bytes in a reused cluster).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { RawDevice } from '#src/formats/raw/raw.js';
import { serveNbd } from '#src/nbd/serve.js';
import { NbdClient } from '../support/nbd-client.js';
import { Gate } from '../support/gate.js';

const KiB = 1024;
const SIZE = 4096 * KiB;
const CLUSTER = 64 * KiB;
const HELD = 0xab;

/** A memory store whose writes carrying HELD wait for `release()`. */
class HeldStore extends MemoryStore {
  private readonly gate = new Gate();
  /** Resolves when the first held write has reached the store. */
  readonly reached = this.gate.reached;

  constructor() {
    super(undefined, { name: 'top.qcow2' });
  }

  release(): void {
    this.gate.open();
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    if (data.includes(HELD)) await this.gate.pass();
    return super.write(offset, data);
  }
}

for (const reused of [false, true]) {
  test(`NBD: one client's read racing another's allocating write ${reused ? 'into a reused cluster ' : ''}reads old or new data`, async () => {
    const store = new HeldStore();
    await createQcow2(store, { size: SIZE, backingFile: 'base.raw', backingFormat: 'raw' });
    const base = new MemoryStore(new Uint8Array(SIZE).fill(0xcc), { name: 'base.raw' });
    const dev = await Qcow2Device.open(store, { openBacking: async () => new RawDevice(base, SIZE, true) });
    await dev.write(0, new Uint8Array(CLUSTER).fill(1)); // the table exists and is cached
    if (reused) {
      await dev.write(CLUSTER, new Uint8Array(CLUSTER).fill(0x5a));
      await dev.discard(CLUSTER, CLUSTER); // reads through to the backing file again
      await dev.flush(); // and its host cluster is free for the next allocation
    }
    const server = await serveNbd(dev, { address: { port: 0 }, maxClients: 2, persistent: true });
    const writer = await NbdClient.connect({ port: server.port! });
    const reader = await NbdClient.connect({ port: server.port! });
    try {
      const writing = writer.write(8 * CLUSTER, new Uint8Array(CLUSTER).fill(HELD));
      await store.reached;
      const reading = reader.read(8 * CLUSTER + 4 * KiB, 4 * KiB);
      // The read has every chance to be answered while the write is held.
      for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
      store.release();
      await writing;
      const got = await reading;
      assert.ok(!got.includes(0x5a), 'the read returned another guest offset\'s discarded bytes');
      assert.ok(got.every((b) => b === 0xcc) || got.every((b) => b === HELD), `read ${got[0]}`);
    } finally {
      await writer.disconnect();
      await reader.disconnect();
      await server.close();
      await dev.close();
    }
  });
}
