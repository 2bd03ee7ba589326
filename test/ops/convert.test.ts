/** convert on in-memory images: what gets written where, for each of qemu-img's modes. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { convert } from '#src/ops/convert.js';
import { compareImages } from '#src/ops/compare.js';
import { QcowError } from '#src/core/errors.js';
import { dataBytes, fill, memQcow2, memRaw, readAll } from './devices.test-helpers.js';
import { randomBytes } from '../support/qemu.js';

const MiB = 1024 * 1024;

test('several sources are written back to back, whatever their sizes', async () => {
  const a = await memRaw(randomBytes(1000, 1));
  const b = await memRaw(randomBytes(3 * MiB + 512, 2));
  const c = await memRaw(randomBytes(70_000, 3));
  const dst = await memRaw(1000 + 3 * MiB + 512 + 70_000);
  await convert([a, b, c], dst, { targetIsZero: true, chunkSize: 256 * 1024, parallel: 3 });
  const got = await readAll(dst);
  assert.deepEqual(got.subarray(0, 1000), randomBytes(1000, 1));
  assert.deepEqual(got.subarray(1000, 1000 + 3 * MiB + 512), randomBytes(3 * MiB + 512, 2));
  assert.deepEqual(got.subarray(1000 + 3 * MiB + 512), randomBytes(70_000, 3));
});

test('a fresh target stays sparse: zero ranges of the source and zero blocks of -S size are not written', async () => {
  const src = await memQcow2(8 * MiB, { opts: { cluster_size: '4096' } });
  await fill(src, MiB, 64 * 1024, 0xab); // data
  await src.write(3 * MiB, new Uint8Array(64 * 1024)); // allocated, but all zero bytes
  await src.writeZeroes(5 * MiB, MiB); // zero clusters: never read
  const dst = await memQcow2(8 * MiB, { opts: { cluster_size: '4096' } });
  await convert([src], dst, { targetIsZero: true });
  assert.equal(await dataBytes(dst), 64 * 1024);
  assert.deepEqual((await compareImages(src, dst)).identical, true);
});

test('-S 0 writes every byte (fully allocated target)', async () => {
  const src = await memQcow2(2 * MiB);
  await fill(src, 0, 4096, 1);
  const dst = await memRaw(2 * MiB);
  const writes: number[] = [];
  const write = dst.write.bind(dst);
  dst.write = async (off, data, o) => {
    writes.push(data.length);
    return write(off, data, o);
  };
  const zeroes: number[] = [];
  const wz = dst.writeZeroes.bind(dst);
  dst.writeZeroes = async (off, len, o) => {
    assert.ok(!o?.mayUnmap, '-S 0 never unmaps');
    zeroes.push(len);
    return wz(off, len, o);
  };
  await convert([src], dst, { targetIsZero: true, sparseSize: 0 });
  const total = writes.reduce((a, b) => a + b, 0) + zeroes.reduce((a, b) => a + b, 0);
  assert.equal(total, 2 * MiB);
});

test('an existing target (-n) gets zeros where the source has none, and nothing else changes', async () => {
  const src = await memQcow2(4 * MiB);
  await fill(src, 2 * MiB, 100_000, 7);
  const dst = await memRaw(new Uint8Array(5 * MiB).fill(0xee));
  await convert([src], dst, { targetIsZero: false });
  const got = await readAll(dst);
  const want = new Uint8Array(5 * MiB).fill(0xee);
  want.fill(0, 0, 4 * MiB);
  want.fill(7, 2 * MiB, 2 * MiB + 100_000);
  assert.deepEqual(got, want);
});

test('with a backing file (-B) only clusters that differ from it are written', async () => {
  const base = await memRaw(4 * MiB, 'base.raw');
  await fill(base, 0, 4 * MiB, 0x11);
  const src = await memQcow2(4 * MiB, { opts: { cluster_size: '65536' } });
  await fill(src, 0, 4 * MiB, 0x11); // same as the base
  await fill(src, MiB, 65536, 0x22); // differs: one cluster
  await src.writeZeroes(3 * MiB, 65536); // zeros where the base has 0x11: must be written
  const dst = await memQcow2(4 * MiB, { backing: base, opts: { cluster_size: '65536' } });
  await convert([src], dst, { targetIsZero: true });
  assert.equal((await compareImages(src, dst)).identical, true);
  const own = (await dst.blockStatus(0, dst.size)).filter((e) => e.allocated).reduce((n, e) => n + e.length, 0);
  assert.equal(own, 2 * 65536);
});

/** Record the [offset, length] of every write `dev` takes. */
function recordWrites(dev: Awaited<ReturnType<typeof memRaw>>): [number, number][] {
  const writes: [number, number][] = [];
  const write = dev.write.bind(dev);
  dev.write = async (off, data, o) => {
    writes.push([off, data.length]);
    return write(off, data, o);
  };
  return writes;
}

/** Count the reads of `dev` under way at once; the most seen so far in `.max`. */
function countReads(dev: Awaited<ReturnType<typeof memRaw>>): { max: number } {
  const seen = { now: 0, max: 0 };
  const read = dev.read.bind(dev);
  dev.read = async (off, into) => {
    seen.max = Math.max(seen.max, ++seen.now);
    // Let the other lanes start theirs before this one ends.
    await new Promise((r) => setTimeout(r, 1));
    try {
      return await read(off, into);
    } finally {
      seen.now--;
    }
  };
  return seen;
}

test('plain copies into raw go in items of 8 MiB, in lanes holding as much buffer as 2 MiB items would', async () => {
  const bytes = randomBytes(26 * MiB, 11);
  const src = await memRaw(bytes);
  const dst = await memRaw(26 * MiB);
  const writes = recordWrites(dst);
  const reads = countReads(src);
  await convert([src], dst, { targetIsZero: true });
  assert.deepEqual(writes, [
    [0, 8 * MiB],
    [8 * MiB, 8 * MiB],
    [16 * MiB, 8 * MiB],
    [24 * MiB, 2 * MiB],
  ]);
  assert.deepEqual(await readAll(dst), bytes);
  // 8 lanes of 2 MiB asked (the default): 2 of 8 MiB. -m 16: 4.
  assert.equal(reads.max, 2);
  const src16 = await memRaw(bytes);
  const reads16 = countReads(src16);
  await convert([src16], await memRaw(26 * MiB), { targetIsZero: true, parallel: 16 });
  assert.equal(reads16.max, 4);
  // An item size asked for is kept, in as many lanes as asked.
  const asked = await memRaw(26 * MiB);
  const askedWrites = recordWrites(asked);
  await convert([src], asked, { targetIsZero: true, chunkSize: 2 * MiB });
  assert.equal(askedWrites.length, 13);
  assert.deepEqual(await readAll(asked), bytes);
});

test('plain copies into qcow2 stay in items of 2 MiB (each stays in the L2 cache between the read, the zero scan and the write), into the same layout', async () => {
  const bytes = randomBytes(10 * MiB, 11);
  const src = await memRaw(bytes);
  const a = await memQcow2(10 * MiB);
  const writes = recordWrites(a);
  await convert([src], a, { targetIsZero: true });
  assert.deepEqual(writes, [
    [0, 2 * MiB],
    [2 * MiB, 2 * MiB],
    [4 * MiB, 2 * MiB],
    [6 * MiB, 2 * MiB],
    [8 * MiB, 2 * MiB],
  ]);
  assert.deepEqual(await readAll(a), bytes);
  // The same guest content lands at the same host offsets whatever the item size.
  const b = await memQcow2(10 * MiB);
  await convert([src], b, { targetIsZero: true, chunkSize: 4 * MiB });
  const layout = async (d: typeof a) => (await d.blockStatus(0, 10 * MiB)).map((e) => [e.offset, e.length, e.hostOffset]);
  assert.deepEqual(await layout(a), await layout(b));
  assert.equal((await compareImages(a, b)).identical, true);
});

test('compressed: every written cluster goes through writeCompressed, zeros are skipped, runs in as few calls as the target takes', async () => {
  // 1 MiB of data, 1 MiB of zeros, one random cluster: two runs of 16 and 1 clusters.
  // 'own': qcow2's (any number); undefined: a target that says nothing takes one cluster per call.
  for (const [max, calls] of [['own', 2], [undefined, 17], [4, 5], [1, 17]] as const) {
    const src = await memRaw(3 * MiB);
    await fill(src, 0, MiB, 0x5a);
    await src.write(2 * MiB, randomBytes(65536, 9));
    const dst = await memQcow2(3 * MiB);
    if (max === 'own') assert.equal(dst.writeCompressedMaxClusters, Number.MAX_SAFE_INTEGER);
    else Object.defineProperty(dst, 'writeCompressedMaxClusters', { value: max });
    const sizes: number[] = [];
    const wc = dst.writeCompressed!.bind(dst);
    dst.writeCompressed = async (off, data) => {
      assert.equal(off % 65536, 0);
      assert.equal(data.length % 65536, 0);
      sizes.push(data.length / 65536);
      return wc(off, data);
    };
    await convert([src], dst, { compress: true, targetIsZero: true });
    assert.equal(sizes.reduce((a, b) => a + b, 0), 17, `max ${max}`);
    assert.equal(sizes.length, calls, `max ${max}: ${sizes.join(',')}`);
    assert.ok(sizes.every((n) => n <= (max === 'own' ? Infinity : (max ?? 1))));
    assert.equal((await compareImages(src, dst)).identical, true);
    assert.ok((await dst.blockStatus(0, MiB)).every((e) => e.compressed));
  }
});

test('a target that is too small or cannot compress is refused before anything is written', async () => {
  const src = await memRaw(MiB);
  await assert.rejects(convert([src], await memRaw(MiB - 512)), /output file is smaller than input file/);
  await assert.rejects(convert([src], await memRaw(MiB), { compress: true }), /Compression not supported/);
});

test('progress climbs to the total; an aborted run stops with QCOW_ABORTED and leaves a readable target', async () => {
  const src = await memRaw(randomBytes(8 * MiB, 4));
  const dst = await memQcow2(8 * MiB);
  const seen: number[] = [];
  await convert([src], dst, { targetIsZero: true, chunkSize: MiB, onProgress: (d, t) => seen.push(d / t) });
  assert.equal(seen.at(-1), 1);
  assert.ok(seen.every((v, i) => i === 0 || v >= seen[i - 1]!));

  const dst2 = await memQcow2(8 * MiB);
  const ac = new AbortController();
  await assert.rejects(
    convert([src], dst2, { targetIsZero: true, chunkSize: MiB, parallel: 2, signal: ac.signal, onProgress: (d) => d >= 2 * MiB && ac.abort() }),
    (e: unknown) => e instanceof QcowError && e.code === 'QCOW_ABORTED',
  );
  await dst2.flush();
  const got = await readAll(dst2);
  const want = randomBytes(8 * MiB, 4);
  // Whatever was written is the source's bytes; the rest is still zero.
  for (let off = 0; off < got.length; off += MiB) {
    const part = got.subarray(off, off + MiB);
    assert.ok(part.every((b) => b === 0) || Buffer.compare(part, want.subarray(off, off + MiB)) === 0, `chunk at ${off}`);
  }
});

test('progress counts the data copied, as qemu-img does: zeros only with sparseSize 0', async () => {
  // qemu's iotest 086: four 1 MiB runs of data in a 128 MiB image, each a quarter of the work.
  const src = await memQcow2(128 * MiB);
  for (const at of [0, 2, 4, 32]) await fill(src, at * MiB, MiB, 7);
  const seen: Array<[number, number]> = [];
  await convert([src], await memQcow2(128 * MiB), { targetIsZero: true, onProgress: (d, t) => seen.push([d, t]) });
  assert.deepEqual(
    seen.map(([d, t]) => d / t),
    [0.25, 0.5, 0.75, 1],
  );
  // Zeros are written with sparseSize 0, so they count too.
  const all: Array<[number, number]> = [];
  await convert([src], await memQcow2(128 * MiB), { targetIsZero: true, sparseSize: 0, onProgress: (d, t) => all.push([d, t]) });
  assert.deepEqual(all.at(-1), [128 * MiB, 128 * MiB]);
});

test('a 4 TiB sparse source is walked by block status, never read', async () => {
  const TiB = 2 ** 40;
  const src = await memQcow2(4 * TiB, { opts: { cluster_size: '2097152' } });
  await fill(src, 3 * TiB, 4096, 0x42);
  let reads = 0;
  const read = src.read.bind(src);
  src.read = async (off, into) => {
    reads += into.length;
    return read(off, into);
  };
  const dst = await memQcow2(4 * TiB, { opts: { cluster_size: '2097152' } });
  await convert([src], dst, { targetIsZero: true });
  assert.ok(reads <= 2 * MiB, `read ${reads} bytes`);
  const buf = new Uint8Array(4096);
  await dst.read(3 * TiB, buf);
  assert.ok(buf.every((b) => b === 0x42));
  assert.equal(await dataBytes(dst), 2 * MiB); // the one cluster holding data
});

test('a reused copy buffer never leaks one chunk\'s data into the zero ranges of the next', async () => {
  // One worker, so one buffer: chunk 0 is all data, chunk 1 has data only in its middle, chunk 2
  // is shorter than the others (the end of the disk), chunk 3 starts past what chunk 0 dirtied.
  // Every zero range must come out as zeros, in a target that is written in full (-S 0) and in
  // an existing, non-zero target (where zeros must be written, not skipped).
  const size = 3 * 256 * 1024 + 100 * 1024;
  const src = await memQcow2(size, { opts: { cluster_size: '4096' } });
  await fill(src, 0, 256 * 1024, 0x11);
  await fill(src, 256 * 1024 + 64 * 1024, 32 * 1024, 0x22);
  await fill(src, 2 * 256 * 1024 + 8192, 4096, 0x33);
  const expected = await readAll(src);
  for (const options of [{ sparseSize: 0 }, { targetIsZero: false }]) {
    const dst = await memRaw(new Uint8Array(size).fill(0xee));
    await convert([src], dst, { ...options, chunkSize: 256 * 1024, parallel: 1 });
    assert.deepEqual(await readAll(dst), expected, JSON.stringify(options));
  }
});

test('a chain is read from the layer that holds each span, the same bytes as through the top', async () => {
  // The base is shorter than the layers above it: past its end the chain reads zeros.
  const base = await memRaw(randomBytes(2 * MiB + 4096, 5), 'base.raw');
  const mid = await memQcow2(4 * MiB, { backing: base, opts: { cluster_size: '4096' } });
  await fill(mid, 64 * 1024, 200 * 1024, 0x22);
  await fill(mid, 2 * MiB, 12 * 1024, 0x23); // past the base's end
  await mid.writeZeroes(MiB, 64 * 1024); // zeros over the base's data
  const top = await memQcow2(4 * MiB, { backing: mid, opts: { cluster_size: '4096' } });
  for (let off = 0; off < 4 * MiB; off += 40 * 1024) await fill(top, off, 4096, 0x33 + (off % 7));
  await top.writeZeroes(96 * 1024, 8192); // zeros over the mid's data
  const want = await readAll(top);
  // The top answers only for what it holds: everything else is asked of the layer below.
  const own = (await top.blockStatus(0, top.size)).filter((e) => e.allocated);
  const read = top.read.bind(top);
  top.read = (off, into) => {
    assert.ok(own.some((e) => e.offset <= off && off + into.length <= e.offset + e.length), `top read at ${off}+${into.length}`);
    return read(off, into);
  };
  for (const parallel of [1, 4]) {
    const dst = await memRaw(4 * MiB);
    await convert([top], dst, { targetIsZero: true, chunkSize: 256 * 1024, parallel });
    assert.deepEqual(await readAll(dst), want);
  }
});

test("the spans of one item that different layers hold are read at once, not one after another", async () => {
  // Every 256 KiB item: its first half from the base, its second half from the top.
  const base = await memRaw(randomBytes(MiB, 6), 'base.raw');
  const top = await memQcow2(MiB, { backing: base, opts: { cluster_size: '4096' } });
  for (let off = 128 * 1024; off < MiB; off += 256 * 1024) await fill(top, off, 128 * 1024, 0x44);
  const want = await readAll(top);
  // Both layers' reads wait until the other layer's read of the same item has started.
  let inFlight = 0;
  let most = 0;
  const gate = (dev: typeof top) => {
    const read = dev.read.bind(dev);
    dev.read = async (off, into) => {
      inFlight++;
      most = Math.max(most, inFlight);
      await new Promise((r) => setTimeout(r, 2));
      inFlight--;
      return read(off, into);
    };
  };
  gate(top);
  gate(base);
  const dst = await memRaw(MiB);
  await convert([top], dst, { targetIsZero: true, chunkSize: 256 * 1024, parallel: 1 });
  assert.deepEqual(await readAll(dst), want);
  assert.equal(most, 2);
});
