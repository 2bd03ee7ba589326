import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';

/** A memory store that counts its reads, and can pose as a debug store (blkdebug's event hook). */
class CountingStore extends MemoryStore {
  reads = 0;
  debugEvent?: (event: string) => undefined;
  override async read(offset: number, into: Uint8Array): Promise<number> {
    this.reads++;
    return super.read(offset, into);
  }
}

async function make(size: number, options: Record<string, string>, debug: boolean): Promise<CountingStore> {
  const store = new CountingStore();
  // A debug store takes the allocator's path (create.ts): the reference for the direct one.
  if (debug) store.debugEvent = () => undefined;
  await createQcow2(store, { size, options: { ...options } });
  return store;
}

/** Size, creation options, and whether the direct path makes it (create.ts). */
const cases: Array<[number, Record<string, string>, boolean?]> = [
  [0, {}],
  [2 ** 20, {}],
  [2 ** 30, {}],
  [100 * 2 ** 30, {}],
  [2 ** 40, {}],
  [64 * 2 ** 20, { cluster_size: '512' }],
  // 512 clusters of L1 table: beyond the 256 counts of one block (512-byte clusters, 16 bits).
  [2 ** 30, { cluster_size: '512' }, false],
  [2 ** 30, { cluster_size: '4096' }],
  [2 ** 40, { cluster_size: '2M' }],
  [2 ** 30, { refcount_bits: '1' }],
  [2 ** 30, { refcount_bits: '64' }],
  // 61 clusters of L1 table are the most one 64-entry refcount block (512-byte clusters, 64-bit
  // counts) holds beside the first three: 122 MiB of guest fits, 123 MiB does not.
  [122 * 2 ** 20, { cluster_size: '512', refcount_bits: '64' }],
  [123 * 2 ** 20, { cluster_size: '512', refcount_bits: '64' }, false],
  [2 ** 30, { compat: '0.10' }],
  [2 ** 30, { extended_l2: 'on' }],
  [2 ** 30, { lazy_refcounts: 'on' }],
];

test('a plain qcow2 image is created without reading back what it wrote, in the same bytes as the allocator makes', async () => {
  for (const [size, options, directly = true] of cases) {
    const direct = await make(size, options, false);
    const reference = await make(size, options, true);
    const what = `${size} ${JSON.stringify(options)}`;
    assert.deepEqual(direct.bytes(), reference.bytes(), what);
    assert.ok(reference.reads > 0, `the allocator's path reads the tables back: ${what}`);
    // Only an L1 table past the first refcount block's reach takes the allocator's path.
    assert.equal(direct.reads === 0, directly, what);
  }
});

test('images with preallocated metadata still go through the allocator', async () => {
  const direct = await make(64 * 2 ** 20, { preallocation: 'metadata' }, false);
  const reference = await make(64 * 2 ** 20, { preallocation: 'metadata' }, true);
  assert.ok(direct.reads > 0);
  assert.deepEqual(direct.bytes(), reference.bytes());
});
