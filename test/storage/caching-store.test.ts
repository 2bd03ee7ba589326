/**
 * CachingStore over an in-memory store that records every read reaching it: hits, what a miss
 * fetches, shared loads, writes and discards through the cache, the memory bound, failures, and
 * random operation sequences against the plain store as the model.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { CachingStore, cachingOpener } from '#src/storage/caching-store.js';
import { openImage } from '#src/chain/open.js';
import { builtinFormats, qcow2Format } from '#src/formats/index.js';
import { MemoryStore } from '#src/storage/memory.js';
import { QcowError } from '#src/core/errors.js';
import type { ByteStore, StoreOpener } from '#src/storage/types.js';

const KiB = 1024;
const isCode = (code: string) => (e: unknown) => e instanceof QcowError && e.code === code;

/** Bytes 0..n-1 where each byte tells its offset (mod 251), so a misplaced copy shows. */
function pattern(n: number): Uint8Array {
  const a = new Uint8Array(n);
  for (let i = 0; i < n; i++) a[i] = i % 251;
  return a;
}

/** A promise and the functions that settle it. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

/**
 * A MemoryStore that records the reads reaching it as [offset, length], and can hold reads at a
 * gate or fail the next ones. Optional members (punchHole, zeroRange, copyTo) as a file has them.
 */
class Recording implements ByteStore {
  readonly reads: [number, number][] = [];
  readonly mem: MemoryStore;
  /** Reads wait on this while it is set. */
  hold: Promise<void> | undefined;
  /** The next this many reads fail. */
  failures = 0;
  sizeCalls = 0;
  flushes = 0;
  closed = false;

  constructor(
    initial: Uint8Array,
    readonly name = 'recording',
  ) {
    this.mem = new MemoryStore(initial);
  }

  get readOnly(): boolean {
    return false;
  }

  async size(): Promise<number> {
    this.sizeCalls++;
    return this.mem.size();
  }

  async read(offset: number, into: Uint8Array): Promise<number> {
    this.reads.push([offset, into.length]);
    // The bytes are taken when the read starts and delivered when the gate opens, as a reply
    // in flight carries what the store held when it was sent.
    const n = await this.mem.read(offset, into);
    if (this.hold) await this.hold;
    if (this.failures > 0) {
      this.failures--;
      throw new QcowError('QCOW_IO', 'the disk said no', { file: this.name });
    }
    return n;
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.mem.write(offset, data);
  }

  truncate(size: number): Promise<void> {
    return this.mem.truncate(size);
  }

  punchHole(offset: number, length: number): Promise<void> {
    return zeroIn(this.mem, offset, length);
  }

  zeroRange(offset: number, length: number): Promise<void> {
    return this.punchHole(offset, length);
  }

  async copyTo(target: ByteStore, from: number, to: number, length: number): Promise<number> {
    if (!(target instanceof Recording)) throw new QcowError('QCOW_UNSUPPORTED', 'not two recording stores');
    const bytes = new Uint8Array(length);
    const n = await this.mem.read(from, bytes);
    await target.mem.write(to, bytes.subarray(0, n));
    return n;
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

/** Zeros over [offset, offset + length) within the store's size (a discard keeps the size). */
async function zeroIn(mem: MemoryStore, offset: number, length: number): Promise<void> {
  const end = Math.min(offset + length, await mem.size());
  if (end > offset) await mem.write(offset, new Uint8Array(end - offset));
}

async function readAt(store: { read(offset: number, into: Uint8Array): Promise<unknown> }, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await store.read(offset, buf);
  return buf;
}

test('a hit is served without reading the wrapped store again', async () => {
  const data = pattern(256 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 64 * KiB, blockSize: 4 * KiB });
  assert.deepEqual(await readAt(store, 5000, 3000), data.subarray(5000, 8000));
  const reads = inner.reads.length;
  assert.deepEqual(await readAt(store, 4096, 4096), data.subarray(4096, 8192));
  assert.deepEqual(await readAt(store, 6000, 10), data.subarray(6000, 6010));
  assert.equal(inner.reads.length, reads);
  assert.equal(inner.sizeCalls, 1, 'the size is asked once');
});

test('a lone miss fetches the blocks it wants; a second miss in the chunk, or a read continuing the last, the rest of the chunk', async () => {
  const data = pattern(512 * KiB);
  const inner = new Recording(data);
  const B = 4 * KiB;
  const C = 64 * KiB;
  const store = new CachingStore(inner, { chunkSize: C, blockSize: B });
  await readAt(store, 2 * C + 100, 10); // one block
  await readAt(store, 2 * C + B - 10, 20); // its block is held, the next one is a second miss in chunk 2
  await readAt(store, 5 * C + 3 * B, 2 * B); // a lone read of two blocks in another chunk: both, in one read
  await readAt(store, 5 * C + 5 * B, 100); // continues the last read: the rest of chunk 5
  await readAt(store, 5 * C + 5 * B + 100, C); // continues the last read, over chunk 5 (held) into chunk 6: all of chunk 6
  assert.deepEqual(inner.reads, [
    [2 * C, B],
    [2 * C + B, C - B],
    [5 * C + 3 * B, 2 * B],
    [5 * C + 5 * B, C - 5 * B],
    [6 * C, C],
  ]);
  // A second miss fills the chunk backwards too, stopping at blocks held.
  inner.reads.length = 0;
  await readAt(store, 7 * C + 8 * B, 1);
  await readAt(store, 7 * C + 10 * B, 1);
  assert.deepEqual(inner.reads, [
    [7 * C + 8 * B, B],
    [7 * C + 9 * B, C - 9 * B],
  ]);
  await readAt(store, 7 * C + 2 * B, 1); // a third miss in chunk 7: from its start up to the blocks held
  assert.deepEqual(inner.reads.at(-1), [7 * C, 8 * B]);
});

test('concurrent readers of one block share one read of the wrapped store', async () => {
  const data = pattern(256 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 64 * KiB, blockSize: 4 * KiB });
  const g = gate();
  inner.hold = g.promise;
  const reads = Array.from({ length: 8 }, (_, i) => readAt(store, 70 * KiB + i * 100, 300));
  await new Promise((r) => setImmediate(r));
  inner.hold = undefined;
  g.open();
  const got = await Promise.all(reads);
  got.forEach((b, i) => assert.deepEqual(b, data.subarray(70 * KiB + i * 100, 70 * KiB + i * 100 + 300)));
  assert.deepEqual(inner.reads, [[68 * KiB, 4 * KiB]]);
});

test('a read wanting a block another read is fetching waits for it instead of fetching it again', async () => {
  const data = pattern(256 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 64 * KiB, blockSize: 4 * KiB });
  const g = gate();
  inner.hold = g.promise;
  const a = readAt(store, 8 * KiB, 8 * KiB); // blocks 2 and 3
  const b = readAt(store, 12 * KiB, 8 * KiB); // block 3 on its way; block 4 a second miss in chunk 0: the rest of chunk 0
  await new Promise((r) => setImmediate(r));
  inner.hold = undefined;
  g.open();
  assert.deepEqual(await a, data.subarray(8 * KiB, 16 * KiB));
  assert.deepEqual(await b, data.subarray(12 * KiB, 20 * KiB));
  assert.deepEqual(inner.reads, [
    [8 * KiB, 8 * KiB],
    [16 * KiB, 48 * KiB],
  ]);
});

test('writes go through and update the blocks held; the size follows', async () => {
  const data = pattern(64 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 16 * KiB, blockSize: 4 * KiB });
  await readAt(store, 0, 64 * KiB); // everything held
  const reads = inner.reads.length;
  await store.write(3 * KiB, new Uint8Array(2 * KiB).fill(0xaa)); // across blocks 0 and 1
  const expected = data.slice();
  expected.fill(0xaa, 3 * KiB, 5 * KiB);
  assert.deepEqual(await readAt(store, 0, 64 * KiB), expected);
  assert.deepEqual(inner.mem.bytes(), expected, 'the wrapped store has the write');
  assert.equal(inner.reads.length, reads, 'served from the updated blocks');

  // Past the end: the store grows, and reads there see the bytes.
  await store.write(64 * KiB + 10, new Uint8Array([1, 2, 3]));
  assert.equal(await store.size(), 64 * KiB + 13);
  const tail = new Uint8Array(16).fill(0xee);
  assert.equal(await store.read(64 * KiB, tail), 13);
  assert.deepEqual(tail, new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0]));
});

test('a read under way when a write lands is not kept: the next read fetches the new bytes', async () => {
  const data = pattern(64 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 16 * KiB, blockSize: 4 * KiB });
  const g = gate();
  inner.hold = g.promise;
  const racing = readAt(store, 0, 100);
  await new Promise((r) => setImmediate(r));
  await store.write(50, new Uint8Array([7, 7, 7]));
  inner.hold = undefined;
  g.open();
  assert.deepEqual([...(await racing).subarray(48, 55)], [48, 49, 50, 51, 52, 53, 54], 'the racing read got the bytes from before the write');
  const after = await readAt(store, 0, 100);
  assert.deepEqual([...after.subarray(48, 55)], [48, 49, 7, 7, 7, 53, 54]);
});

test('discards, zeroing and truncation read as zeros through the cache; a shrunk store drops the blocks past its end', async () => {
  const data = pattern(64 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 16 * KiB, blockSize: 4 * KiB });
  await readAt(store, 0, 64 * KiB);
  await store.punchHole!(1000, 2000);
  await store.zeroRange!(10 * KiB, 10 * KiB);
  const expected = data.slice();
  expected.fill(0, 1000, 3000);
  expected.fill(0, 10 * KiB, 20 * KiB);
  assert.deepEqual(await readAt(store, 0, 64 * KiB), expected);
  assert.equal(await store.size(), 64 * KiB, 'discards keep the size');

  const held = store.cachedBytes;
  await store.truncate(30 * KiB + 5);
  assert.equal(await store.size(), 30 * KiB + 5);
  assert.ok(store.cachedBytes <= held - 8 * 4 * KiB, `blocks past the end dropped: ${store.cachedBytes} of ${held} bytes held`);
  await store.truncate(40 * KiB); // grows with zeros
  const reads = inner.reads.length;
  const grown = await readAt(store, 28 * KiB, 4 * KiB);
  assert.deepEqual(grown.subarray(0, 2 * KiB + 5), expected.subarray(28 * KiB, 30 * KiB + 5));
  assert.ok(grown.subarray(2 * KiB + 5).every((b) => b === 0), 'what the cut took reads as zeros');
  assert.equal(inner.reads.length, reads, 'the block across the cut was kept, zeroed past it');
  assert.deepEqual(await readAt(store, 0, 40 * KiB), inner.mem.bytes());
});

test('the cache never holds more than its budget; the least recently used block goes first', async () => {
  const data = pattern(1024 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 64 * KiB, blockSize: 4 * KiB, cacheBytes: 40 * KiB });
  let seed = 1;
  for (let i = 0; i < 300; i++) {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    const offset = seed % (1000 * KiB);
    const length = 1 + (seed % Math.min(150 * KiB, data.length - offset));
    assert.deepEqual(await readAt(store, offset, length), data.subarray(offset, offset + length));
    assert.ok(store.cachedBytes <= 40 * KiB, `${store.cachedBytes} bytes held`);
  }
  const lru = new CachingStore(new Recording(data), { chunkSize: 4 * KiB, cacheBytes: 12 * KiB });
  const lruInner = lru.inner as Recording;
  for (const k of [0, 1, 2, 0, 3]) await readAt(lru, k * 4 * KiB, 1); // 3 pushes out 1, the least recently used
  lruInner.reads.length = 0;
  for (const k of [0, 2, 3]) await readAt(lru, k * 4 * KiB, 1);
  assert.deepEqual(lruInner.reads, []);
  await readAt(lru, 4 * KiB, 1);
  assert.deepEqual(lruInner.reads, [[4 * KiB, 4 * KiB]]);
});

test('a failed read reaches every reader waiting on it and is not cached: the next read tries again', async () => {
  const data = pattern(64 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 16 * KiB, blockSize: 4 * KiB });
  inner.failures = 1;
  const g = gate();
  inner.hold = g.promise;
  const a = readAt(store, 100, 10);
  const b = readAt(store, 200, 10);
  await new Promise((r) => setImmediate(r));
  inner.hold = undefined;
  g.open();
  await assert.rejects(a, isCode('QCOW_IO'));
  await assert.rejects(b, isCode('QCOW_IO'));
  assert.equal(store.cachedBytes, 0);
  assert.deepEqual(await readAt(store, 100, 10), data.subarray(100, 110));
  assert.equal(inner.reads.length, 2);

  // A failed write leaves the range unknown: its blocks are dropped, and read again.
  const failing = new CachingStore(
    Object.assign(new Recording(data), {
      write: () => Promise.reject(new QcowError('QCOW_IO', 'no space')),
    }),
    { chunkSize: 16 * KiB, blockSize: 4 * KiB },
  );
  await readAt(failing, 0, 8 * KiB);
  await assert.rejects(failing.write(100, new Uint8Array(10)), isCode('QCOW_IO'));
  assert.equal(failing.cachedBytes, 4 * KiB, 'the written block is dropped, its neighbour kept');
});

test('flush and close pass through; optional members exist only where the wrapped store has them', async () => {
  const inner = new Recording(pattern(8 * KiB));
  const store = new CachingStore(inner, { chunkSize: 4 * KiB });
  await store.flush();
  assert.equal(inner.flushes, 1);
  assert.equal(typeof store.punchHole, 'function');
  assert.equal(store.dataRuns, undefined);
  const plain = new CachingStore(new MemoryStore(new Uint8Array(10), { readOnly: true, name: 'ro' }));
  assert.equal(plain.name, 'ro');
  assert.equal(plain.readOnly, true);
  assert.equal(plain.punchHole, undefined);
  assert.equal(plain.copyTo, undefined);
  await assert.rejects(plain.write(0, new Uint8Array(1)), isCode('QCOW_READ_ONLY'));
  await readAt(store, 0, 100);
  await store.close();
  assert.equal(inner.closed, true);
  assert.equal(store.cachedBytes, 0);
  await assert.rejects(store.read(0, new Uint8Array(1)), isCode('QCOW_IO'));
});

test('a copy into a caching store goes between the wrapped stores and updates the target cache', async () => {
  const src = new CachingStore(new Recording(new Uint8Array(16 * KiB).fill(9)), { chunkSize: 4 * KiB });
  const dst = new CachingStore(new Recording(new Uint8Array(16 * KiB).fill(1)), { chunkSize: 4 * KiB });
  assert.deepEqual(await readAt(dst, 0, 16 * KiB), new Uint8Array(16 * KiB).fill(1));
  assert.equal(await src.copyTo!(dst, 0, 6 * KiB, 4 * KiB), 4 * KiB);
  const expected = new Uint8Array(16 * KiB).fill(1);
  expected.fill(9, 6 * KiB, 10 * KiB);
  assert.deepEqual(await readAt(dst, 0, 16 * KiB), expected);
});

test('prime keeps bytes already read as blocks; invalidate forgets them', async () => {
  const data = pattern(40 * KiB);
  const inner = new Recording(data);
  const store = new CachingStore(inner, { chunkSize: 16 * KiB, blockSize: 4 * KiB });
  await store.prime(4 * KiB, data.slice(4 * KiB, 14 * KiB)); // blocks 1 and 2 whole, 3 partial
  await store.prime(36 * KiB, data.slice(36 * KiB)); // the last block, to the end of the store
  assert.equal(store.cachedBytes, 3 * 4 * KiB);
  assert.deepEqual(await readAt(store, 5 * KiB, 7 * KiB), data.subarray(5 * KiB, 12 * KiB));
  assert.deepEqual(await readAt(store, 39 * KiB, 2 * KiB), new Uint8Array([...data.subarray(39 * KiB), ...new Uint8Array(KiB)]));
  assert.deepEqual(inner.reads, []);
  // The store changed behind the cache's back: told so, it reads again.
  await inner.mem.write(5 * KiB, new Uint8Array([1]));
  store.invalidate(5 * KiB, 1);
  assert.equal((await readAt(store, 5 * KiB, 1))[0], 1);
  store.invalidate();
  assert.equal(store.cachedBytes, 0);
});

test('bad options and offsets are QCOW_INVALID_ARGUMENT', async () => {
  const inner = new MemoryStore(new Uint8Array(10));
  assert.throws(() => new CachingStore(inner, { chunkSize: 0 }), isCode('QCOW_INVALID_ARGUMENT'));
  assert.throws(() => new CachingStore(inner, { chunkSize: 4096, blockSize: 1000 }), isCode('QCOW_INVALID_ARGUMENT'));
  assert.throws(() => new CachingStore(inner, { chunkSize: 4096, blockSize: 512, cacheBytes: 100 }), isCode('QCOW_INVALID_ARGUMENT'));
  const store = new CachingStore(inner, { chunkSize: 4096 });
  await assert.rejects(store.read(-1, new Uint8Array(1)), isCode('QCOW_INVALID_ARGUMENT'));
  await assert.rejects(store.read(0.5, new Uint8Array(1)), isCode('QCOW_INVALID_ARGUMENT'));
});

type Op =
  | { kind: 'read'; off: number; len: number }
  | { kind: 'write'; off: number; len: number; byte: number }
  | { kind: 'discard'; off: number; len: number }
  | { kind: 'truncate'; size: number }
  | { kind: 'reads'; offs: number[] };

test('random operation sequences read as the plain store does, within the budget', async () => {
  const SIZE = 96 * KiB;
  const range = fc.integer({ min: 0, max: SIZE }).chain((off) => fc.record({ off: fc.constant(off), len: fc.integer({ min: 1, max: 20 * KiB }) }));
  const op: fc.Arbitrary<Op> = fc.oneof(
    { weight: 4, arbitrary: range.map((r) => ({ kind: 'read' as const, ...r })) },
    { weight: 3, arbitrary: fc.record({ r: range, byte: fc.integer({ min: 0, max: 255 }) }).map(({ r, byte }) => ({ kind: 'write' as const, ...r, byte })) },
    { weight: 1, arbitrary: range.map((r) => ({ kind: 'discard' as const, ...r })) },
    { weight: 1, arbitrary: fc.integer({ min: 0, max: SIZE + 8 * KiB }).map((size) => ({ kind: 'truncate' as const, size })) },
    { weight: 2, arbitrary: fc.array(fc.integer({ min: 0, max: SIZE }), { minLength: 2, maxLength: 6 }).map((offs) => ({ kind: 'reads' as const, offs })) },
  );
  await fc.assert(
    fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 40 }), async (ops) => {
      const initial = pattern(SIZE);
      const model = new MemoryStore(initial);
      const store = new CachingStore(new Recording(initial), { chunkSize: 16 * KiB, blockSize: 2 * KiB, cacheBytes: 24 * KiB });
      for (const o of ops) {
        switch (o.kind) {
          case 'read':
            assert.deepEqual(await readAt(store, o.off, o.len), await readAt(model, o.off, o.len));
            break;
          case 'write': {
            const bytes = new Uint8Array(o.len).fill(o.byte);
            await store.write(o.off, bytes);
            await model.write(o.off, bytes);
            break;
          }
          case 'discard':
            await store.punchHole!(o.off, o.len);
            await zeroIn(model, o.off, o.len);
            break;
          case 'truncate':
            await store.truncate(o.size);
            await model.truncate(o.size);
            break;
          case 'reads': {
            // Concurrent reads with nothing written meanwhile: each sees the store as it is.
            const got = await Promise.all(o.offs.map((off) => readAt(store, off, 3 * KiB)));
            for (let i = 0; i < got.length; i++) assert.deepEqual(got[i], await readAt(model, o.offs[i]!, 3 * KiB));
            break;
          }
        }
        assert.equal(await store.size(), await model.size());
        assert.ok(store.cachedBytes <= 24 * KiB);
      }
      assert.deepEqual((store.inner as Recording).mem.bytes(), model.bytes());
    }),
    { seed: 20261206, numRuns: 60 },
  );
});

test('a qcow2 chain opened through cachingOpener reads and writes as without it', async () => {
  const MiB = 2 ** 20;
  const files = new Map<string, MemoryStore>();
  const plain: StoreOpener = {
    open: async (name) => {
      const f = files.get(name);
      if (!f) throw new QcowError('QCOW_NOT_FOUND', 'no such file', { file: name });
      return f;
    },
    resolve: (name) => name,
  };
  const base = new MemoryStore();
  await qcow2Format.create(base, { size: 4 * MiB, options: { cluster_size: '4096' } });
  const top = new MemoryStore();
  await qcow2Format.create(top, { size: 4 * MiB, backingFile: 'base.qcow2', backingFormat: 'qcow2', options: { cluster_size: '4096' } });
  files.set('base.qcow2', base);
  files.set('top.qcow2', top);
  const model = new Uint8Array(4 * MiB);
  const baseDev = await openImage('base.qcow2', { opener: cachingOpener(plain, { chunkSize: 64 * KiB }), formats: builtinFormats() });
  await baseDev.write(MiB, new Uint8Array(300 * KiB).fill(0x11));
  model.fill(0x11, MiB, MiB + 300 * KiB);
  await baseDev.close();

  const wrapped: ByteStore[] = [];
  const opener = cachingOpener(plain, { chunkSize: 64 * KiB, cacheBytes: 256 * KiB });
  const dev = await openImage('top.qcow2', {
    opener: { ...opener, open: async (name, o) => (wrapped.push(await opener.open(name, o)), wrapped.at(-1)!) },
    formats: builtinFormats(),
  });
  let seed = 5;
  for (let i = 0; i < 60; i++) {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    const off = seed % (4 * MiB - 70 * KiB);
    const len = 1 + (seed % (70 * KiB));
    if (i % 3 === 0) {
      const bytes = new Uint8Array(len).fill(i);
      await dev.write(off, bytes);
      model.set(bytes, off);
    } else {
      assert.deepEqual(await readAt(dev, off, len), model.subarray(off, off + len), `read ${i} at ${off}`);
    }
  }
  await dev.close();
  assert.deepEqual(
    wrapped.map((s) => s instanceof CachingStore),
    [true, true],
  );
  // Opened again without caches: the files hold what was written through them.
  const again = await openImage('top.qcow2', { opener: plain, formats: builtinFormats(), readOnly: true });
  assert.deepEqual(await readAt(again, 0, 4 * MiB), model);
  await again.close();
});
