import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open, readFile } from 'node:fs/promises';
import { openImage } from '#src/node.js';
import { join } from 'node:path';
import { needs, qemuImg, qemuIo, scratch } from '../../support/qemu.js';
import { addRefcount, checkRefcountBits, decodeRefcountTable, decodeRefcountTableInto, encodeRefcountTable, entriesPerBlock, getRefcount, maxRefcount, refcountText, refcountsZero, setRefcount, setRefcountsToOne, REFCOUNT_WIDTHS } from '#src/formats/qcow2/refcount.js';

test('every width round-trips values 0..max at every index of a block', () => {
  for (const bits of REFCOUNT_WIDTHS) {
    const block = new Uint8Array(512);
    const n = entriesPerBlock(512, bits);
    const max = maxRefcount(bits);
    const value = (i: number) => (bits >= 32 ? (i * 2654435761) % max : i % (max + 1));
    for (let i = 0; i < n; i++) setRefcount(block, i, bits, value(i));
    for (let i = 0; i < n; i++) assert.equal(getRefcount(block, i, bits), value(i), `bits ${bits} index ${i}`);
  }
});

test('a run of counts is zero-tested and set to one exactly as entry by entry, at every width', () => {
  for (const bits of REFCOUNT_WIDTHS) {
    const n = entriesPerBlock(512, bits);
    // Runs at the block's edges and at odd places inside it (sub-byte widths share bytes).
    for (const [first, len] of [[0, 1], [0, n], [1, 7], [n - 3, 3], [5, 40], [n - 1, 1]] as const) {
      const block = new Uint8Array(512);
      // Neighbours of the run hold counts that must stay as they are.
      if (first > 0) setRefcount(block, first - 1, bits, 1);
      if (first + len < n) setRefcount(block, first + len, bits, 1);
      assert.equal(refcountsZero(block, first, len, bits), true, `bits ${bits} run ${first}+${len}`);
      setRefcountsToOne(block, first, len, bits);
      for (let i = 0; i < n; i++) {
        const want = (i >= first && i < first + len) || i === first - 1 || i === first + len ? 1 : 0;
        assert.equal(getRefcount(block, i, bits), want, `bits ${bits} run ${first}+${len} index ${i}`);
      }
      // One count inside a run makes it non-zero, wherever it is.
      const probe = new Uint8Array(512);
      setRefcount(probe, first + len - 1, bits, 1);
      assert.equal(refcountsZero(probe, first, len, bits), false, `bits ${bits} run ${first}+${len} with its last entry set`);
      assert.equal(first === 0 || refcountsZero(probe, 0, first, bits), true);
    }
  }
});

test('16-bit runs set to one give big-endian 0x0001 in blocks at even and at odd places in memory', () => {
  // setRefcountsToOne fills 16-bit words where the run is 2-byte aligned in memory, and stores
  // bytes where it is not (a block viewed at an odd offset of its buffer).
  for (const shift of [0, 1, 2]) {
    const block = new Uint8Array(512 + shift).subarray(shift);
    block.fill(0xee, 0, 4);
    block.fill(0xee, 24, 28);
    setRefcountsToOne(block, 2, 10, 16);
    assert.deepEqual([...block.subarray(0, 28)], [0xee, 0xee, 0xee, 0xee, ...Array.from({ length: 10 }, () => [0, 1]).flat(), 0xee, 0xee, 0xee, 0xee], `shift ${shift}`);
    for (let i = 2; i < 12; i++) assert.equal(getRefcount(block, i, 16), 1);
  }
});

test('sub-byte widths fill a byte from its least significant bits; wider ones are big-endian', () => {
  const expect: Record<number, number[]> = {
    1: [0x3f],
    2: [0x55, 0x05],
    4: [0x11, 0x11, 0x11],
    8: [1, 1, 1, 1, 1, 1],
    16: [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
  };
  for (const [bits, bytes] of Object.entries(expect)) {
    const block = new Uint8Array(64);
    for (let i = 0; i < 6; i++) setRefcount(block, i, Number(bits), 1);
    assert.deepEqual([...block.subarray(0, bytes.length)], bytes, `refcount_bits ${bits}`);
  }
});

test('setting one entry leaves its neighbours alone', () => {
  for (const bits of [1, 2, 4]) {
    const block = new Uint8Array(8).fill(0xff);
    setRefcount(block, 3, bits, 0);
    for (let i = 0; i < entriesPerBlock(8, bits); i++) assert.equal(getRefcount(block, i, bits), i === 3 ? 0 : maxRefcount(bits));
  }
});

test('values that do not fit and widths that do not exist are refused', () => {
  assert.throws(() => setRefcount(new Uint8Array(8), 0, 1, 2), /does not fit/);
  assert.throws(() => setRefcount(new Uint8Array(8), 0, 16, -1), /does not fit/);
  assert.throws(() => checkRefcountBits(3), /power of two/);
  assert.throws(() => checkRefcountBits(128), /power of two/);
});

test('64-bit counts past 2^53 are valid: read as the nearest double, added to and printed exactly', () => {
  // QEMU holds every width in a uint64_t: 2^64 - 1 is a count, not corruption (iotest 112).
  const top = new Uint8Array(8).fill(0xff);
  assert.equal(getRefcount(top, 0, 64), 2 ** 64);
  assert.equal(refcountText(top, 0, 64), '18446744073709551615');
  assert.equal(addRefcount(top, 0, 64, 1, true), 'overflow');
  assert.equal(refcountText(top, 0, 64), '18446744073709551615', 'an overflow stores nothing');
  // The top bit set: one less is exact (a number would have rounded it back to 2^63).
  const msb = new Uint8Array([0x80, 0, 0, 0, 0, 0, 0, 0]);
  assert.notEqual(addRefcount(msb, 0, 64, -1, false), 'underflow');
  assert.equal(refcountText(msb, 0, 64), '9223372036854775808', 'not stored without `store`');
  addRefcount(msb, 0, 64, -1, true);
  assert.equal(refcountText(msb, 0, 64), '9223372036854775807');
  assert.equal(addRefcount(new Uint8Array(8), 0, 64, -1, true), 'underflow');
  // The narrow widths keep their limits; results come back as numbers.
  const narrow = new Uint8Array(1);
  assert.equal(addRefcount(narrow, 0, 2, 3, true), 3);
  assert.equal(addRefcount(narrow, 0, 2, 1, true), 'overflow');
  assert.equal(addRefcount(narrow, 0, 2, -3, true), 0);
  assert.equal(refcountText(narrow, 0, 2), '0');
});

test('refcount table entries: offsets round-trip; misaligned or reserved bits are corruption', () => {
  const buf = encodeRefcountTable([0x10000, 0, 0x30000]);
  assert.deepEqual(decodeRefcountTable(buf, 3, 0x10000), [0x10000, 0, 0x30000]);
  assert.throws(() => decodeRefcountTable(encodeRefcountTable([0x10200]), 1, 0x10000), /not cluster aligned/);
  assert.throws(() => decodeRefcountTable(encodeRefcountTable([0x10001]), 1, 0x10000), /reserved bits/);
});

test('our decoding of qemu-made refcount blocks gives 1 for the six used clusters, for every width', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const bits of REFCOUNT_WIDTHS) {
    const f = join(dir, `rb${bits}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits}`, f, '4M']);
    await qemuIo(['-f', 'qcow2', '-c', 'write -P 0xab 0 64k', f]);
    const file = new Uint8Array(await readFile(f));
    // Layout of a fresh qemu image: header, refcount table, refcount block, L1, then L2 and data.
    const table = decodeRefcountTable(file.subarray(0x10000, 0x20000), 0x10000 / 8, 0x10000);
    assert.equal(table[0], 0x20000);
    const block = file.subarray(0x20000, 0x30000);
    const counts = Array.from({ length: 8 }, (_, i) => getRefcount(block, i, bits));
    assert.deepEqual(counts, [1, 1, 1, 1, 1, 1, 0, 0], `refcount_bits ${bits}`);
  }
});

test('refcount table decode: zero entries skipped, any set bit still decoded or refused, at any byte offset of the buffer', () => {
  const table = encodeRefcountTable([0, 0, 0x30000, 0, 0x7fff0000, 0]);
  for (const shift of [0, 1, 4]) {
    // The same bytes as a view at an offset that is, and is not, a multiple of 4.
    const backing = new Uint8Array(table.length + shift);
    backing.set(table, shift);
    const buf = backing.subarray(shift);
    assert.deepEqual(decodeRefcountTable(buf, 6, 0x10000), [0, 0, 0x30000, 0, 0x7fff0000, 0]);
    // A lone reserved bit in an otherwise zero entry is not taken for an empty entry.
    buf[5 * 8 + 7] = 1;
    assert.throws(() => decodeRefcountTable(buf, 6, 0x10000), /entry 5 .*reserved bits set/);
    buf[5 * 8 + 7] = 0;
    buf[3 * 8] = 0x01;
    assert.throws(() => decodeRefcountTable(buf, 6, 0x10000), /entry 3 .*too large/);
  }
});

test('refcount table decode: long tables with entries far apart and past 4 GiB, bytes after the entries ignored', () => {
  const offsets = new Array<number>(1000).fill(0);
  for (const i of [0, 1, 7, 8, 63, 500, 998]) offsets[i] = (i + 1) * 0x80000000 + 0x10000;
  const buf = encodeRefcountTable([...offsets, 0x12345]); // the last is not an entry of the table
  assert.deepEqual(decodeRefcountTable(buf, 1000, 0x10000), offsets);
  assert.deepEqual(decodeRefcountTable(buf, 999, 0x10000), offsets.slice(0, 999));
});

test('refcount table decode into a typed array (the allocator\'s table): the same entries and errors as into an array', () => {
  const offsets = new Array<number>(1000).fill(0);
  for (const i of [0, 1, 7, 8, 63, 500, 998]) offsets[i] = (i + 1) * 0x80000000 + 0x10000;
  const buf = encodeRefcountTable(offsets);
  const out = new Float64Array(1000);
  assert.equal(decodeRefcountTableInto(out, buf, 1000, 0x10000), out);
  assert.deepEqual(Array.from(out), decodeRefcountTable(buf, 1000, 0x10000));
  assert.throws(() => decodeRefcountTableInto(new Float64Array(1), encodeRefcountTable([0x10200]), 1, 0x10000), /not cluster aligned/);
  // Leniently (as an open image reads it), a misaligned entry is kept with its reserved bits dropped.
  assert.deepEqual(Array.from(decodeRefcountTableInto(new Float64Array(1), encodeRefcountTable([0x10201]), 1, 0x10000, { unalignedLater: true })), [0x10200]);
});

test('refcount table entries decoded leniently (as an open image reads them) keep offsets whose low word has bit 31 set', () => {
  // Blocks at 2 GiB, 3 GiB and 6 GiB: the low 32-bit word of each entry is 0x80000000 or more.
  const offsets = [0x80000000, 0xc0010000, 0x180000000, 0x1fffffff0000];
  const buf = encodeRefcountTable(offsets);
  assert.deepEqual(decodeRefcountTable(buf, offsets.length, 0x10000), offsets);
  assert.deepEqual(decodeRefcountTable(buf, offsets.length, 0x10000, { unalignedLater: true }), offsets);
  // The reserved bits are dropped, the offset kept.
  assert.deepEqual(decodeRefcountTable(encodeRefcountTable([0x80000000 + 0x1ff]), 1, 0x10000, { unalignedLater: true }), [0x80000000]);
});

test('a refcount block the table places at 2 GiB is read and written where it is (qemu-img check stays clean)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'high-refblock.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '1G']);
  // Move refcount block 0 (it counts clusters 0 to 32767) to 2 GiB, a sparse hole away, and make
  // a block 1 at cluster 4 that counts it: header, table, L1 and block 1 are counted by block 0.
  const cs = 0x10000;
  const high = 0x80000000;
  const fh = await open(file, 'r+');
  try {
    const block0 = new Uint8Array(cs);
    for (const c of [0, 1, 3, 4]) setRefcount(block0, c, 16, 1);
    const block1 = new Uint8Array(cs);
    setRefcount(block1, 0, 16, 1);
    await fh.write(block0, 0, cs, high);
    await fh.write(block1, 0, cs, 4 * cs);
    await fh.write(encodeRefcountTable([high, 4 * cs]), 0, 16, cs);
    await fh.write(new Uint8Array(cs), 0, cs, 2 * cs); // the old block 0, now unused
  } finally {
    await fh.close();
  }
  await qemuImg(['check', file]);
  const dev = await openImage(file);
  await dev.write(0, new Uint8Array(cs).fill(0x11));
  await dev.close();
  await qemuImg(['check', file]);
  await qemuIo(['-c', 'read -P 0x11 0 64k', file]);
});
