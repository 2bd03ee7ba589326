/**
 * L2 write-back on eviction against guest writes running beside it. Before a table is written
 * back, its dependency (Qcow2Writer.beforeL2Write) makes the refcounts its entries need durable;
 * a guest write that changes that table, or the refcount blocks, while the dependency runs must
 * not get its entry onto the disk ahead of its refcount. Guest writes that need no I/O take no
 * lock turn (write.ts writeNow), so this holds only if no write-back runs outside the writer's
 * lock: a reader's cache miss used to write back the least recently used dirty table itself.
 *
 * The store keeps the image as it stands after every completed write (what a kill at that moment
 * leaves) and holds one chosen write or flush at a gate, during which the guest write is issued.
 * Every image kept must check without corruption (leaks are allowed), by our check and, when it
 * is installed, by qemu-img's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { checkQcow2 } from '#src/formats/qcow2/check.js';
import { hasTool, run, scratch } from '../../support/qemu.js';

const KiB = 1024;
const CLUSTER = 4 * KiB;
/** Guest bytes one L2 table maps (512 entries of 4 KiB clusters). */
const TABLE_SPAN = 512 * CLUSTER;
/** Room for four tables, the least the cache keeps. */
const CACHE_BYTES = 4 * CLUSTER;

interface Gate {
  /** Resolves when the held operation is reached. */
  reached: Promise<void>;
  wasReached: boolean;
  release(): void;
}

/** A memory store that keeps its content after every completed write, and can hold one operation. */
class RecordingStore extends MemoryStore {
  /** The image after each write since `recording` was set. */
  readonly images: Uint8Array[] = [];
  recording = false;
  private gate: { kind: 'write' | 'flush'; reached: () => void; released: Promise<void>; state: Gate } | undefined;

  /** Hold the next write (or flush) until `release()`. */
  holdNext(kind: 'write' | 'flush'): Gate {
    let reached!: () => void;
    let release!: () => void;
    const state: Gate = { reached: new Promise<void>((r) => (reached = r)), wasReached: false, release: () => release() };
    const released = new Promise<void>((r) => (release = r));
    this.gate = { kind, reached, released, state };
    return state;
  }

  private async passGate(kind: 'write' | 'flush'): Promise<void> {
    const g = this.gate;
    if (!g || g.kind !== kind) return;
    this.gate = undefined;
    g.state.wasReached = true;
    g.reached();
    await g.released;
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    // The bytes as they were when the write was issued (the earliest a kernel may take them).
    const bytes = data.slice();
    await this.passGate('write');
    await super.write(offset, bytes);
    if (this.recording) this.images.push(this.bytes());
  }

  override async flush(): Promise<void> {
    await this.passGate('flush');
    await super.flush();
  }
}

const filled = (n: number, v: number) => new Uint8Array(n).fill(v);

/**
 * Tables 0-4 on disk and named by the L1 table there; tables 0-3 cached and dirty again (table 0
 * least recently used), table 4 not cached;
 * then `trigger` loads a fifth table, so table 0 is evicted (or, 'flush', writes every table
 * back), and the store holds the first write or flush after that; meanwhile a guest write fills a
 * fresh cluster of table 0.
 */
async function race(trigger: 'read' | 'write' | 'flush', hold: 'write' | 'flush'): Promise<{ store: RecordingStore; gate: Gate; late: Uint8Array }> {
  const store = new RecordingStore(undefined, { name: 'evict.qcow2' });
  await createQcow2(store, { size: 8 * TABLE_SPAN, options: { cluster_size: String(CLUSTER) } });
  const dev = await Qcow2Device.open(store, { cacheBytes: CACHE_BYTES });
  store.recording = true;
  // Table 4 first: inserting table 3 evicts it. The flush puts every table and L1 on disk, so
  // what is written to tables 0-3 from now on is reachable on disk at once.
  for (const i of [4, 0, 1, 2, 3]) await dev.write(i * TABLE_SPAN, filled(CLUSTER, 10 + i));
  await dev.flush();
  for (let i = 0; i < 4; i++) await dev.write(i * TABLE_SPAN + 2 * CLUSTER, filled(CLUSTER, 20 + i));
  const gate = store.holdNext(hold);
  const triggered =
    trigger === 'read' ? dev.read(4 * TABLE_SPAN, new Uint8Array(CLUSTER)) : trigger === 'write' ? dev.write(5 * TABLE_SPAN, filled(CLUSTER, 5)) : dev.flush();
  await Promise.race([gate.reached, triggered]);
  // A fresh cluster in table 0: a new refcount and a new entry, made while the eviction's
  // dependency (refcount write, barrier) may be under way.
  const late = dev.write(CLUSTER, filled(CLUSTER, 99));
  await new Promise((r) => setImmediate(r));
  gate.release();
  await Promise.all([triggered, late]);
  const back = new Uint8Array(CLUSTER);
  await dev.read(CLUSTER, back);
  await dev.close();
  return { store, gate, late: back };
}

/** Check every image kept: no corruption, by our check and by qemu-img's when it is installed. */
async function checkAll(t: Parameters<typeof scratch>[0], images: Uint8Array[]): Promise<void> {
  const useQemu = hasTool('qemu-img');
  const dir = useQemu ? await scratch(t) : '';
  for (let i = 0; i < images.length; i++) {
    if (i > 0 && Buffer.compare(images[i]!, images[i - 1]!) === 0) continue;
    const ours = await checkQcow2(new MemoryStore(images[i]!));
    assert.equal(ours.corruptions, 0, `after write ${i + 1} of ${images.length}: ${ours.messages.join('; ')}`);
    if (!useQemu) continue;
    const file = join(dir, `after-${i}.qcow2`);
    await writeFile(file, images[i]!);
    const r = await run('qemu-img', ['check', '--output=json', file]);
    assert.ok(r.code === 0 || r.code === 3, `after write ${i + 1}: qemu-img check exit ${r.code}\n${r.stdout}${r.stderr}`);
    assert.equal(JSON.parse(r.stdout).corruptions ?? 0, 0, `after write ${i + 1}`);
  }
}

for (const { trigger, hold, what } of [
  { trigger: 'read', hold: 'write', what: 'while the refcount block is being written' },
  { trigger: 'read', hold: 'flush', what: 'while the barrier after the refcounts runs' },
  { trigger: 'write', hold: 'write', what: 'while the refcount block is being written' },
  { trigger: 'write', hold: 'flush', what: 'while the barrier after the refcounts runs' },
  { trigger: 'flush', hold: 'write', what: 'while the refcount block is being written' },
  { trigger: 'flush', hold: 'flush', what: 'while the barrier after the refcounts runs' },
] as const) {
  const action = trigger === 'flush' ? 'a flush that writes dirty L2 tables back' : `a ${trigger} that evicts a dirty L2 table`;
  test(`${action}, and a guest write into that table ${what}: a kill after any write leaves no corruption`, async (t) => {
    const { store, gate, late } = await race(trigger, hold);
    assert.ok(gate.wasReached, 'the write-back reached the gate');
    assert.ok(late.every((b) => b === 99), 'the late write reads back');
    assert.ok(store.images.length > 10, `${store.images.length} images kept`);
    await checkAll(t, store.images);
    // And the closed image itself.
    await checkAll(t, [store.bytes()]);
  });
}
