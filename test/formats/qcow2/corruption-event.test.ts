/**
 * Corruption found while writing, as QEMU's qcow2 handles it (iotest 305): an image whose refcount
 * table names an unaligned block still opens and reads; the write that needs that block fails,
 * the image is marked corrupt on disk, later writes in the session fail, and nothing half-updated
 * is written back on close.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { qcow2Format } from '#src/formats/index.js';
import { MemoryStore } from '#src/storage/memory.js';
import { CorruptionEvent, QcowError } from '#src/core/errors.js';
import { INCOMPAT_CORRUPT } from '#src/formats/qcow2/features.js';
import { decodeHeader } from '#src/formats/qcow2/header.js';

test('an unaligned refcount block is refused when an allocation needs it, and the image is marked corrupt', async () => {
  const store = new MemoryStore();
  // 1 KiB clusters and 64-bit refcounts: one refcount block covers 128 clusters.
  await qcow2Format.create(store, { size: 1024 * 1024, options: { cluster_size: '1024', refcount_bits: '64' } });
  let dev = await qcow2Format.open(store);
  await dev.write(0, new Uint8Array(124 * 1024).fill(0x5a)); // fills the first block, starts the second
  await dev.discard(121 * 1024, 1024);
  await dev.discard(123 * 1024, 1024);
  await dev.close();
  // Knock the second refcount block's offset off alignment (as 305 does: +0x600).
  const bytes = new Uint8Array(await store.size());
  await store.read(0, bytes);
  const tableAt = Number(new DataView(bytes.buffer).getBigUint64(48));
  const entry = new DataView(bytes.buffer).getBigUint64(tableAt + 8);
  new DataView(bytes.buffer).setBigUint64(tableAt + 8, entry + 0x600n);
  const broken = new MemoryStore(bytes);
  dev = await qcow2Format.open(broken);
  const head = new Uint8Array(1024);
  await dev.read(0, head);
  assert.equal(head[0], 0x5a, 'reads still work');
  const err = await dev.write(121 * 1024, new Uint8Array(3 * 1024).fill(1)).then(() => undefined, (e: unknown) => e);
  assert.ok(err instanceof CorruptionEvent, String(err));
  assert.match(err.message, /^Refblock offset 0x[0-9a-f]+ unaligned \(reftable index: 0x1\)$/);
  assert.equal(err.markedCorrupt, true);
  const again = await dev.write(0, new Uint8Array(512)).then(() => undefined, (e: unknown) => e);
  assert.ok(again instanceof QcowError && again.code === 'QCOW_CORRUPT' && /marked corrupt/.test(again.message));
  await dev.close();
  const after = new Uint8Array(4096);
  await broken.read(0, after);
  assert.ok((decodeHeader(after).incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n, 'the corrupt bit is on disk');
});
