/**
 * qcow v1 reads racing allocating writes: the writer writes a new cluster's bytes (the rest of a
 * partial cluster copied from the backing file) before it changes its tables in memory, so a
 * read meanwhile sees the old mapping (the backing file) or, once linked, the new data; never
 * the unwritten cluster (qcow2 links early and makes such reads wait, see
 * test/formats/qcow2/read-during-alloc.test.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { MemoryStore } from '#src/storage/memory.js';
import type { ByteStore } from '#src/storage/types.js';
import { memImage } from './qcow1.test.helpers.js';

const KiB = 1024;
const HELD = 0xab;

/** Holds the store's writes carrying HELD until `release()`. */
function holder() {
  let open!: () => void;
  let reachedOnce!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  const reached = new Promise<void>((r) => (reachedOnce = r));
  const wrap = (store: MemoryStore): ByteStore =>
    new Proxy(store, {
      get(target, key) {
        if (key === 'write') {
          return async (offset: number, data: Uint8Array) => {
            if (data.includes(HELD)) {
              reachedOnce();
              await gate;
            }
            return target.write(offset, data);
          };
        }
        const v = Reflect.get(target, key, target) as unknown;
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
  return { wrap, reached, release: () => open() };
}

for (const [what, at, length, readAt] of [
  ['other bytes of a cluster being written partially', 9 * KiB, KiB, 11 * KiB],
  ['a whole cluster being allocated', 8 * KiB, 4 * KiB, 9 * KiB],
] as const) {
  test(`qcow v1: a read of ${what} reads the backing data or the new data`, async () => {
    const h = holder();
    const img = await memImage({ size: 1024 * KiB, backing: new Uint8Array(1024 * KiB).fill(0xcc), wrap: h.wrap });
    await img.dev.write(0, new Uint8Array(4 * KiB).fill(1)); // the L2 table exists
    const writing = img.dev.write(at, new Uint8Array(length).fill(HELD));
    await h.reached;
    const got = new Uint8Array(KiB);
    const reading = img.dev.read(readAt, got);
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    h.release();
    await writing;
    await reading;
    const inWrite = readAt >= at && readAt < at + length;
    assert.ok(got.every((b) => b === 0xcc) || (inWrite && got.every((b) => b === HELD)), `read ${got[0]}`);
    await img.dev.close();
  });
}
