import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { PendingLinks } from '#src/formats/qcow1/links.js';

/** A store that logs flushes and writes in order. */
class LoggingStore extends MemoryStore {
  readonly log: string[] = [];
  override async write(offset: number, data: Uint8Array): Promise<void> {
    this.log.push(`write ${offset} ${data.length}`);
    await super.write(offset, data);
  }
  override async flush(): Promise<void> {
    this.log.push('flush');
    await super.flush();
  }
}

test('pending links go out after one flush, as the changed ranges of each table and of L1', async () => {
  const store = new LoggingStore(new Uint8Array(8192), { name: 'links.qcow' });
  const links = new PendingLinks();
  const table = new BigUint64Array(512);
  table[3] = 0x1000n;
  table[7] = 0x2000n;
  links.l2Changed(4096, 7);
  links.l2Changed(4096, 3);
  const l1 = new Uint8Array(64);
  l1[8 * 2 + 7] = 0x10;
  links.l1Changed(2);
  assert.ok(await links.sync(store, { offset: 1024, bytes: l1 }, async (offset) => (assert.equal(offset, 4096), table)));
  assert.deepEqual(store.log, ['flush', `write ${4096 + 8 * 3} ${8 * 5}`, `write ${1024 + 16} 8`]);
  const back = new Uint8Array(40);
  await store.read(4096 + 24, back);
  assert.equal(new DataView(back.buffer).getBigUint64(0), 0x1000n);
  assert.equal(new DataView(back.buffer).getBigUint64(32), 0x2000n);
  // Nothing pending: no flush, nothing written.
  store.log.length = 0;
  assert.equal(await links.sync(store, { offset: 1024, bytes: l1 }, async () => table), false);
  assert.deepEqual(store.log, []);
});

test('a sync is due after 32 MiB of data or 64 tables held for their links', () => {
  const links = new PendingLinks();
  assert.equal(links.due(0), false);
  assert.equal(links.due(64), true);
  links.wrote(32 << 20);
  assert.equal(links.due(0), true);
});
