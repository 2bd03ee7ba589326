/**
 * The write side of reading an image from a stream: guest data, as the stream readers find it,
 * into the target, with few writes and no copies where the bytes allow.
 *
 * Data for consecutive guest offsets is gathered into one write (a write per 64 KiB cluster cost
 * 3x). Clusters that also lie one after the other in the stream reader's memory (a run of data
 * clusters as qemu-img lays them out, read into one slab) are written as one view of it, no copy:
 * the reader's memory is pinned until the write is done. Other small pieces (512-byte clusters,
 * subclusters) are copied into a run buffer; other large ones (decompressed, decrypted, a chunk of
 * the input) are written as they are, at once, since their producer may reuse them.
 */
import type { BlockDevice } from '../core/block-device.js';
import type { ClusterReader } from './cluster-reader.js';

/** The most bytes one gathered write holds. */
const RUN_BYTES = 2 * 1024 * 1024;
/** Pieces this large are not copied to be gathered: that cost more in copies than it saved. */
const DIRECT_BYTES = 64 * 1024;
/**
 * Bytes of memory in writes still in flight (the reader's, pinned, and run buffers): each MiB
 * more is memory allocated anew (a slab the reader cannot reuse, a run buffer).
 */
const BUSY_BYTES = 2 * 1024 * 1024;
/** Writes in flight at most. */
const IN_FLIGHT = 8;

export class GatheredWrites {
  private readonly writes = new Set<Promise<void>>();
  /** The first write that failed; the readers stop at it. */
  failure: unknown;
  private run: { guest: number; buf: Uint8Array; used: number; view: boolean } | undefined;
  private busyBytes = 0;
  /** Run buffers whose write is done, for the next runs. */
  private readonly spareRuns: Uint8Array[] = [];

  constructor(
    private readonly target: BlockDevice,
    private readonly reader: ClusterReader,
  ) {}

  /** `data` at guest offset `guest`: a view of the reader's memory, or memory nobody reuses before the next call. */
  write(guest: number, data: Uint8Array): void {
    const r = this.run;
    if (r && r.guest + r.used === guest && r.used + data.length <= RUN_BYTES) {
      if (r.view && data.buffer === r.buf.buffer && r.buf.byteOffset + r.used === data.byteOffset) {
        r.used += data.length;
        r.buf = new Uint8Array(data.buffer, r.buf.byteOffset, r.used);
        return;
      }
      if (!r.view && r.used + data.length <= r.buf.length) {
        r.buf.set(data, r.used);
        r.used += data.length;
        return;
      }
    }
    this.flush();
    if (this.reader.pin(data)) {
      this.run = { guest, buf: data, used: data.length, view: true };
      return;
    }
    if (data.length >= DIRECT_BYTES) {
      this.issue(guest, data, 'none');
      return;
    }
    const buf = this.spareRuns.pop() ?? new Uint8Array(RUN_BYTES);
    buf.set(data);
    this.run = { guest, buf, used: data.length, view: false };
  }

  /** Start the write of what is gathered. */
  flush(): void {
    const r = this.run;
    if (!r) return;
    this.run = undefined;
    this.issue(r.guest, r.buf.subarray(0, r.used), r.view ? 'pinned' : 'run');
  }

  /** Wait while too many writes, or too much memory, are in flight. */
  async backPressure(): Promise<void> {
    while (this.writes.size >= IN_FLIGHT || this.busyBytes > BUSY_BYTES) await Promise.race(this.writes);
  }

  /** Write what is gathered and wait for every write; the first failure is thrown. */
  async settle(): Promise<void> {
    this.flush();
    while (this.writes.size > 0) await Promise.all(this.writes);
    if (this.failure !== undefined) throw this.failure;
  }

  /** `memory`: the reader's (unpinned when written), a run buffer (reused), or the caller's. */
  private issue(guest: number, data: Uint8Array, memory: 'pinned' | 'run' | 'none'): void {
    const done = () => {
      this.writes.delete(p);
      if (memory === 'pinned') {
        this.reader.unpin(data);
        this.busyBytes -= data.length;
      } else if (memory === 'run') {
        this.busyBytes -= RUN_BYTES;
        if (this.spareRuns.length < 4) this.spareRuns.push(new Uint8Array(data.buffer, data.byteOffset, RUN_BYTES));
      }
    };
    if (memory === 'pinned') this.busyBytes += data.length;
    else if (memory === 'run') this.busyBytes += RUN_BYTES;
    const p: Promise<void> = this.target.write(guest, data).then(done, (e: unknown) => {
      done();
      this.failure ??= e;
    });
    this.writes.add(p);
  }
}
