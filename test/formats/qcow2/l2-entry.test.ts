/** L2 entries decode as qemu 7.2 wrote them (values from docs/notes/qcow2-pitfalls.md §3-5). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { contiguousEntries, contiguousEntriesJs, l2EntryInvalid, readL2Entry, subclusterKind, subclusterRange } from '#src/formats/qcow2/l2-entry.js';
import { hostAddon } from '#src/host/native.node.js';
import { compressedDescriptor } from '#src/formats/qcow2/compressed-descriptor.js';

const table = (...entries: bigint[]) => {
  const b = new Uint8Array(entries.length * 8);
  entries.forEach((e, i) => new DataView(b.buffer).setBigUint64(i * 8, e));
  return b;
};
const split = (e: bigint): [number, number] => [Number(e >> 32n), Number(e & 0xffffffffn)];
const std = { clusterBits: 16, extendedL2: false, externalDataFile: false };

test('standard entries: normal, ZERO_PLAIN, ZERO_ALLOC, unallocated; COPIED is ignored', () => {
  const t = table(0x8000000000050000n, 0x1n, 0x8000000000050001n, 0n, 0x0000000000050000n);
  assert.deepEqual([0, 1, 2, 3, 4].map((i) => readL2Entry(t, i, std).kind), ['normal', 'zero-plain', 'zero-alloc', 'unallocated', 'normal']);
  assert.equal(readL2Entry(t, 2, std).hostOffset, 0x50000);
});

test('external data file: offset 0 with COPIED is a real cluster; with the zero flag it reads zeros', () => {
  const ctx = { ...std, externalDataFile: true };
  const t = table(0x8000000000000000n, 0x8000000000000001n, 0n);
  assert.deepEqual([0, 1, 2].map((i) => readL2Entry(t, i, ctx).kind), ['normal', 'zero-plain', 'unallocated']);
});

test('compressed descriptors split by cluster_bits (docs/notes/qcow2-pitfalls.md §4 table)', () => {
  const cases: [bigint, number, number, number][] = [
    [0x6000000000000b88n, 9, 0xb88, 1],
    [0x4c00000000005547n, 12, 0x5547, 3],
    [0x498000000005009en, 16, 0x5009e, 38],
    [0x4974000000a00000n, 21, 0xa00000, 1210],
  ];
  for (const [e, cb, off, extra] of cases) {
    const d = compressedDescriptor(...split(e), cb);
    assert.equal(d.hostOffset, off);
    assert.equal(d.bound, (extra + 1) * 512 - (off % 512));
  }
  // The compressed flag wins over bit 0 (which belongs to the offset).
  assert.equal(readL2Entry(table(0x4000000000050001n), 0, std).kind, 'compressed');
});

test('compressed descriptors decode as the 62-bit arithmetic of the spec says, for every cluster size', () => {
  // The decoder works on two 32-bit halves; this is the spec's arithmetic on the whole descriptor.
  const reference = (e: bigint, cb: number) => {
    const x = BigInt(62 - (cb - 8));
    const off = e & ((1n << x) - 1n);
    const nsec = ((e >> x) & ((1n << BigInt(cb - 8)) - 1n)) + 1n;
    return { off, nsec };
  };
  let seed = 0x9e3779b9;
  const rand32 = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return seed >>> 0;
  };
  for (let cb = 9; cb <= 21; cb++) {
    for (let i = 0; i < 400; i++) {
      // Random sector counts; offsets below 2^53 three times in four, the rest anywhere (those
      // past 2^53 must be refused, not rounded).
      const highBits = 62 - (cb - 8) - 32;
      const offsetMask = i % 4 === 0 ? (1 << highBits) - 1 : ((1 << highBits) - 1) & 0x1fffff;
      const hi = 0x40000000 | ((rand32() & ((1 << (cb - 8)) - 1)) << highBits) | (rand32() & offsetMask);
      const lo = rand32();
      const e = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo);
      const { off, nsec } = reference(e, cb);
      if (off + nsec * 512n > BigInt(Number.MAX_SAFE_INTEGER)) {
        assert.throws(() => compressedDescriptor(hi, lo, cb), /too large/);
        continue;
      }
      const d = compressedDescriptor(hi, lo, cb);
      assert.equal(d.hostOffset, Number(off), `cb ${cb} e ${e.toString(16)}`);
      assert.equal(d.bound, Number(nsec) * 512 - (Number(off) % 512), `cb ${cb} e ${e.toString(16)}`);
    }
  }
});

test('extended L2: allocated / zero bitmaps decide each subcluster (docs/notes/qcow2-pitfalls.md §5)', () => {
  const ctx = { ...std, extendedL2: true };
  const t = table(0x8000000000050000n, 0x4n, 0n, 0x0000000300000000n, 0x8000000000060000n, 0x00000001fffffffen);
  const a = readL2Entry(t, 0, ctx);
  assert.deepEqual([0, 1, 2, 3].map((i) => subclusterKind(a, i, true)), ['unallocated-alloc', 'unallocated-alloc', 'normal', 'unallocated-alloc']);
  const b = readL2Entry(t, 1, ctx);
  assert.deepEqual([0, 1, 2].map((i) => subclusterKind(b, i, true)), ['zero-plain', 'zero-plain', 'unallocated']);
  const c = readL2Entry(t, 2, ctx);
  assert.deepEqual([0, 1, 31].map((i) => subclusterKind(c, i, true)), ['zero-alloc', 'normal', 'normal']);
  // Both bits set, or allocated without a host cluster: corruption.
  assert.throws(() => subclusterKind(readL2Entry(table(0x8000000000050000n, 0x0000000100000001n), 0, ctx), 0, true), /both allocated and zero/);
  assert.throws(() => subclusterKind(readL2Entry(table(0n, 1n), 0, ctx), 0, true), /no host offset/);
});

test('host offsets at or above 2^53 are corruption, not rounded numbers', () => {
  assert.throws(() => readL2Entry(table(0x80f0000000000000n), 0, std), /2\^53/);
});

test('contiguousEntries: runs end at a gap, a flag change or max; the addon agrees with the JavaScript', () => {
  const cs = 4096;
  // Four contiguous clusters crossing 4 GiB (the carry into the high word), then a gap.
  const base = 0x8000_0000_0000_0000n | (0x1_0000_0000n - 2n * BigInt(cs));
  const run = [0, 1, 2, 3].map((k) => base + BigInt(k * cs));
  const t = table(...run, base + 10n * BigInt(cs), 0n);
  assert.equal(contiguousEntries(t, 0, 6, cs), 4);
  assert.equal(contiguousEntriesJs(t, 0, 6, cs), 4);
  assert.equal(contiguousEntriesJs(t, 0, 3, cs), 3, 'at most max');
  assert.equal(contiguousEntriesJs(t, 1, 1, cs), 2, 'one entry is a run of one');
  // The ZERO flag on the third entry: the same offset sequence but other flags ends the run.
  const flagged = table(0x50000n, 0x51000n, 0x52001n, 0x53000n);
  assert.equal(contiguousEntriesJs(flagged, 0, 4, cs), 2);

  const addon = hostAddon();
  if (!addon?.contiguousEntries) return;
  const native = addon.contiguousEntries;
  let seed = 99;
  const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) % n;
  for (let round = 0; round < 300; round++) {
    const size = [512, 4096, 65536, 2 * 1024 * 1024][rand(4)]!;
    const n = 1 + rand(600);
    // Start anywhere, low word near 2^32 now and then; break the run (offset or flag) sometimes.
    let e = (rand(2) ? 0x8000_0000_0000_0000n : 0n) | (BigInt(rand(1 << 20)) << 32n) | (rand(3) === 0 ? 0xffff_0000n : 0n) | BigInt(rand(1 << 12) * 512);
    const entries: bigint[] = [];
    for (let k = 0; k < n; k++) {
      entries.push(e);
      e = (e + BigInt(size)) & 0xffff_ffff_ffff_ffffn;
      if (rand(200) === 0) e ^= 1n << BigInt(rand(64));
    }
    const t2 = table(...entries);
    const index = rand(n);
    const max = 1 + rand(n - index);
    assert.equal(native(t2, index, max, size), contiguousEntriesJs(t2, index, max, size), `round ${round}`);
    // A fractional max (a range that ends inside a cluster) counts the entry holding its end.
    assert.equal(contiguousEntries(t2, index, max - 0.5, size), contiguousEntriesJs(t2, index, max - 0.5, size), `round ${round}, max - 0.5`);
  }
  // Past the table, or no entry at all: refused, not read.
  assert.throws(() => native(t, 3, 4, cs), RangeError);
  assert.throws(() => native(t, 0, 0, cs), RangeError);
  assert.throws(() => native(new Uint16Array(8) as unknown as Uint8Array, 0, 1, cs), TypeError);
});

test('an extended entry is invalid as a whole: any contradictory subcluster taints every one of them', () => {
  const ctx = { clusterBits: 16, extendedL2: true, externalDataFile: false };
  const table = (entry: bigint, bitmap: bigint) => {
    const t = new Uint8Array(16);
    const v = new DataView(t.buffer);
    v.setBigUint64(0, entry);
    v.setBigUint64(8, bitmap);
    return t;
  };
  // Subcluster 5 allocated and zero: subcluster 0, which alone looks fine, is refused too.
  const bad = readL2Entry(table(0x8000000000050000n, (1n << 37n) | 0x21n), 0, ctx);
  assert.equal(l2EntryInvalid(bad, true), true);
  assert.throws(() => subclusterKind(bad, 0, true), /both allocated and zero/);
  assert.equal(l2EntryInvalid(readL2Entry(table(0n, 1n << 31n), 0, ctx), true), true);
  // Zero bits without a host cluster, and a compressed entry's bitmap, are fine.
  assert.equal(l2EntryInvalid(readL2Entry(table(0n, 0xffffffff00000000n), 0, ctx), true), false);
  assert.equal(l2EntryInvalid(readL2Entry(table(0x4000000000050000n, 0x180000000n), 0, ctx), true), false);
  assert.equal(subclusterRange(0, 32), -1);
  assert.equal(subclusterRange(15, 5) >>> 0, 0xf8000);
});
