/**
 * check and check -r all on damaged snapshot tables, without QEMU: the table read as qemu-img
 * check reads it (every field kept, qemu's limits), the repair's rewrite (QEMU's defaults for what
 * an entry lacks) and its write order (the new table durable before the header names it).
 * snapshot-check.interop.test.ts compares the same damage with qemu-img itself.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { scratch } from '../../support/qemu.js';
import { createImage, openImage } from '#src/node.js';
import { MemoryStore } from '#src/storage/memory.js';
import type { ByteStore } from '#src/storage/types.js';
import { checkQcow2 } from '#src/formats/qcow2/check.js';
import { createSnapshot } from '#src/formats/qcow2/snapshot-write.js';
import { encodeStoredSnapshotTable, readSnapshotTable, readStoredSnapshotTable, type StoredSnapshot } from '#src/formats/qcow2/snapshot-table.js';
import type { Qcow2Device } from '#src/formats/qcow2/qcow2.js';

const be = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);

/** A 1 MiB v3 image of 4 KiB clusters with data and two snapshots, and where its entries are. */
async function imageWithSnapshots(t: Parameters<typeof scratch>[0]): Promise<{ bytes: Uint8Array; tableOffset: number; entries: number[] }> {
  const dir = await scratch(t);
  const file = join(dir, 's.qcow2');
  await createImage(file, { format: 'qcow2', size: 1 << 20, options: { cluster_size: '4k' } });
  const dev = (await openImage(file, { format: 'qcow2' })) as Qcow2Device;
  try {
    await dev.write(0, new Uint8Array(64 * 1024).fill(1));
    await createSnapshot(dev, 's1');
    await dev.write(0, new Uint8Array(8 * 1024).fill(2));
    await createSnapshot(dev, 's2');
  } finally {
    await dev.close();
  }
  const bytes = new Uint8Array(await readFile(file));
  const v = be(bytes);
  const tableOffset = Number(v.getBigUint64(64));
  const entries: number[] = [];
  let pos = tableOffset;
  for (let i = 0; i < v.getUint32(60); i++) {
    entries.push(pos);
    pos += 40 + v.getUint32(pos + 36) + v.getUint16(pos + 12) + v.getUint16(pos + 14);
    pos = Math.ceil(pos / 8) * 8;
  }
  return { bytes, tableOffset, entries };
}

/** A store that logs its writes and flushes, in order. */
function logged(store: ByteStore, log: string[]): ByteStore {
  return {
    name: store.name,
    readOnly: store.readOnly,
    size: () => store.size(),
    read: (o, b) => store.read(o, b),
    write: async (o, b) => {
      log.push(`write ${o} ${b.length}`);
      await store.write(o, b);
    },
    truncate: (n) => store.truncate(n),
    close: () => store.close(),
    flush: async () => {
      log.push('flush');
      await store.flush();
    },
  };
}

test('check reports an L1 offset past 2^53 in a snapshot entry as qemu-img does, instead of refusing the table', async (t) => {
  const { bytes, entries } = await imageWithSnapshots(t);
  const unaligned = bytes.slice();
  be(unaligned).setBigUint64(entries[1]!, (1n << 60n) + 8n);
  const r = await checkQcow2(new MemoryStore(unaligned, { readOnly: true }));
  assert.equal(r.checkErrors, 0);
  assert.ok(r.messages.includes('ERROR snapshot 2 (s2) l1_offset=0x1000000000000008: L1 table is not cluster aligned; snapshot table entry corrupted'), r.messages.join('\n'));
  // Aligned but far past the end of the file: the region is a corruption, the table reads as zeros.
  const far = bytes.slice();
  be(far).setBigUint64(entries[1]!, 1n << 60n);
  const f = await checkQcow2(new MemoryStore(far, { readOnly: true }));
  assert.equal(f.checkErrors, 0);
  assert.ok(f.messages.some((m) => m.startsWith('ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x1000000000000000 size 0x')));
  // Past what QEMU's block layer addresses: the check cannot finish, as qemu-img's cannot.
  const beyond = bytes.slice();
  be(beyond).setBigUint64(entries[1]!, 0x7fffffffc0000000n);
  await assert.rejects(checkQcow2(new MemoryStore(beyond, { readOnly: true })), /^QcowError: ERROR: I\/O error in check_refcounts_l1/);
});

test('the stored table keeps every field, and qemu-img check limits hold: too much extra data fails, or is cut by a repair', async (t) => {
  const { bytes, tableOffset, entries } = await imageWithSnapshots(t);
  const damaged = bytes.slice();
  be(damaged).setUint32(entries[1]! + 36, 2000);
  const store = new MemoryStore(damaged);
  await assert.rejects(readStoredSnapshotTable(store, 2, tableOffset, damaged.length, { repair: false }), /Too much extra metadata in snapshot table entry 1/);
  const cut = await readStoredSnapshotTable(store, 2, tableOffset, damaged.length, { repair: true });
  assert.deepEqual(cut.messages, ['Discarding too much extra metadata in snapshot table entry 1 (2000 > 1024)']);
  assert.equal(cut.extraDropped, 1);
  assert.equal(cut.snapshots[1]!.extraDataSize, 1024);
  assert.equal(cut.snapshots[1]!.unknownExtra.length, 1000);
  // More entries than there are: what follows reads as entries (zeros past the end of the file).
  const more = await readStoredSnapshotTable(store, 5, damaged.length - 8, damaged.length, { repair: false });
  assert.equal(more.snapshots.length, 5);
  assert.equal(more.size, 5 * 40);
});

test('a rewritten entry gets what qemu gives one without extra data: the virtual size, an icount of all ones', () => {
  const table = encodeStoredSnapshotTable(
    [
      {
        l1TableOffset: 0x10000n,
        l1Size: 1,
        id: new Uint8Array([0x31, 0, 0x32]),
        name: new TextEncoder().encode('old'),
        dateSec: 5,
        dateNsec: 6,
        vmClockNsec: 7n,
        vmStateSize: 0x100000000n,
        extraDataSize: 8,
        unknownExtra: new Uint8Array(0),
      },
    ],
    (1 << 20) + 100,
  );
  const v = be(table);
  assert.equal(v.getUint32(36), 24);
  assert.equal(v.getUint16(12), 1, 'the id ends at its NUL byte');
  assert.equal(v.getUint32(32), 0, 'a VM state over 4 GiB leaves the old field 0');
  assert.equal(v.getBigUint64(40), 0x100000000n);
  assert.equal(v.getBigUint64(48), BigInt(1 << 20), 'the virtual size in whole sectors');
  assert.equal(v.getBigUint64(56), 0xffffffffffffffffn);
  assert.equal(table.length, 40 + 24 + 1 + 3, 'no padding after the last entry');
});

test('check -r all completes incomplete entries (one cut short, one the count adds past the table); the new table is flushed before the header names it', async (t) => {
  const { bytes, entries } = await imageWithSnapshots(t);
  const damaged = bytes.slice();
  // Entry 1 keeps 8 bytes of its extra data (id and name moved up behind them), and the header
  // claims a third entry, read from the zeros after the table.
  const v = be(damaged);
  const e1 = entries[1]!;
  const extra = v.getUint32(e1 + 36);
  const idName = damaged.slice(e1 + 40 + extra, e1 + 40 + extra + v.getUint16(e1 + 12) + v.getUint16(e1 + 14));
  v.setUint32(e1 + 36, 8);
  damaged.fill(0, e1 + 48, e1 + 40 + extra + idName.length);
  damaged.set(idName, e1 + 48);
  v.setUint32(60, 3);
  const before = await checkQcow2(new MemoryStore(damaged.slice(), { readOnly: true }));
  assert.equal(before.corruptions, 2, before.messages.join("\n"));
  assert.deepEqual(
    before.messages.filter((m) => /snapshot table/.test(m)),
    ['ERROR snapshot table entry 1 is incomplete', 'ERROR snapshot table entry 2 is incomplete'],
  );
  const store = new MemoryStore(damaged);
  const log: string[] = [];
  const r = await checkQcow2(logged(store, log), { repair: 'all' });
  assert.equal(r.corruptions, 0);
  assert.equal(r.corruptionsFixed, 2);
  assert.equal(r.checkErrors, 0);
  const headerAt = log.indexOf('write 60 12');
  assert.ok(headerAt > 0, log.join('\n'));
  const newTable = Number(be(store.bytes()).getBigUint64(64));
  const tableWrite = log.findIndex((l) => l.startsWith(`write ${newTable} `));
  assert.ok(tableWrite >= 0 && tableWrite < headerAt && log.slice(tableWrite, headerAt).includes('flush'), log.join('\n'));
  assert.equal(log[headerAt + 1], 'flush');
  // Clean by our own check, and readable by the strict reader the device uses.
  const again = await checkQcow2(new MemoryStore(store.bytes().slice(), { readOnly: true }));
  assert.deepEqual([again.corruptions, again.leaks, again.checkErrors], [0, 0, 0], again.messages.join('\n'));
  const after = be(store.bytes());
  const snaps = await readSnapshotTable(store, after.getUint32(60), Number(after.getBigUint64(64)), store.bytes().length, 0);
  assert.equal(snaps.length, 3);
  assert.equal(snaps[0]!.name, 's1');
  assert.equal(snaps[2]!.diskSize, 1 << 20);
});

test('a snapshot table is read in windows that start small and grow, never past the end of the file', async () => {
  // Every image with a snapshot reads its table when it opens; a table of one entry read into a
  // 256 KiB window cost each command the zeroed window's pages.
  const entry = (i: number): StoredSnapshot => ({
    l1TableOffset: 0x10000n,
    l1Size: 1,
    id: new TextEncoder().encode(String(i + 1)),
    name: new TextEncoder().encode(`snapshot-${i}-${'x'.repeat(i % 50)}`),
    dateSec: i,
    dateNsec: 0,
    vmClockNsec: 0n,
    vmStateSize: 0n,
    extraDataSize: 24,
    unknownExtra: new Uint8Array(0),
  });
  const at = 8192;
  for (const count of [1, 4000]) {
    const table = encodeStoredSnapshotTable(Array.from({ length: count }, (_, i) => entry(i)), 1 << 20);
    const bytes = new Uint8Array(at + table.length);
    bytes.set(table, at);
    const inner = new MemoryStore(bytes, { readOnly: true });
    const reads: Array<[number, number]> = [];
    const store: ByteStore = {
      name: inner.name,
      readOnly: true,
      size: () => inner.size(),
      read: (o, b) => {
        reads.push([o, b.length]);
        return inner.read(o, b);
      },
      write: (o, b) => inner.write(o, b),
      truncate: (n) => inner.truncate(n),
      close: () => inner.close(),
      flush: () => inner.flush(),
    };
    const got = await readStoredSnapshotTable(store, count, at, bytes.length, { repair: false });
    assert.deepEqual(
      got.snapshots.map((s) => new TextDecoder().decode(s.name)),
      Array.from({ length: count }, (_, i) => new TextDecoder().decode(entry(i).name)),
    );
    assert.equal(got.size, table.length);
    assert.ok(reads[0]![1] <= 4096, `first read ${reads[0]![1]} bytes`);
    for (const [o, n] of reads) assert.ok(o + n <= bytes.length && n <= 256 * 1024, `read ${n} at ${o}`);
    if (count === 1) assert.equal(reads.length, 1);
    else assert.ok(reads.length < 16, `${reads.length} reads`);
  }
});
