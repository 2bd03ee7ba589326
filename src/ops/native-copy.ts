/**
 * The native copy loop of a plain convert into a raw file (native/copy_loop.c, through the host
 * addon's copyExtents): one call on libuv's thread pool per work item reads the item's source
 * ranges, scans them for zero blocks and writes them, where the TypeScript loop of convert.ts
 * makes one read per span (one per layer of a backing chain), a zero scan and one write per run,
 * each with node:fs's wrappers and promise reactions around it.
 *
 * It takes only items whose data is plain bytes of local files: raw images, qcow2's normal
 * clusters (external data files too), in any layer of a chain. Anything else (compressed or
 * encrypted clusters, formats without plainExtents, stores without a descriptor: HTTP, NBD, the
 * browser) goes the TypeScript way, item by item, with the same result. The decisions are
 * chunkWrites' for a target without backing file and without compression (see copy_loop.c);
 * write-behind is told of each run written, as a write() would have.
 */
import type { BlockDevice } from '../core/block-device.js';
import type { ByteStore } from '../storage/types.js';
import { nativeCopyExtents, type CopyExtents } from '#host-copy';
import { QcowError } from '../core/errors.js';
import type { ConcatSource } from './concat.js';

/** A data item as convert's planner cuts it: spans in order, zero or data at a layer's depth. */
export interface CopyItem {
  offset: number;
  length: number;
  spans: { offset: number; length: number; zero: boolean; depth: number }[];
}

/** One lane's arrays for the loop, made once and reused for every item. */
export interface NativeLane {
  extents: Float64Array;
  stores: ByteStore[];
  runs: Float64Array;
}

/** The loop for one convert: the raw target's descriptor and where its guest offset 0 lies. */
export class NativeCopy {
  private constructor(
    private readonly copy: CopyExtents,
    private readonly target: BlockDevice,
    private readonly store: ByteStore,
    private readonly fd: number,
    private readonly base: number,
    private readonly unit: number,
    private readonly flags: number,
    private readonly chunk: number,
  ) {}

  /**
   * The loop into `target` (a raw image), or undefined where it cannot run: no addon, a target
   * whose store has no descriptor to write (or must flush each write), an empty target.
   * `sparse` and `targetIsZero` are convert's; `chunk` is the largest item.
   */
  static async for(target: BlockDevice, sparse: number, targetIsZero: boolean, chunk: number): Promise<NativeCopy | undefined> {
    const copy = nativeCopyExtents();
    if (!copy || target.format !== 'raw' || !target.plainExtents || target.size === 0) return undefined;
    // A raw image opened by probing checks what is written to its block 0 (RawDevice.restrictsBlockZero),
    // which writes straight to the descriptor would go around.
    if ((target as { restrictsBlockZero?: boolean }).restrictsBlockZero) return undefined;
    const [whole] = await target.plainExtents(0, target.size);
    const store = whole?.store;
    const fd = store?.directFd?.(true);
    if (!store || fd === undefined || whole.hostOffset === undefined || whole.length !== target.size) return undefined;
    const unit = sparse === 0 ? 512 : Math.max(512, sparse);
    return new NativeCopy(copy, target, store, fd, whole.hostOffset, unit, (targetIsZero ? 1 : 0) | (sparse === 0 ? 2 : 0), chunk);
  }

  lane(): NativeLane {
    return { extents: new Float64Array(3 * 16), stores: [], runs: new Float64Array(3 * (Math.ceil(this.chunk / this.unit) + 2)) };
  }

  /**
   * Where the item's bytes are, into `lane.extents`: its count of extents, or -1 when some of its
   * data is not plain bytes of a local file (the item then goes the TypeScript way).
   */
  async place(src: ConcatSource, item: CopyItem, lane: NativeLane): Promise<number> {
    let n = 0;
    lane.stores.length = 0;
    const push = (fd: number, at: number, length: number) => {
      if (3 * n + 3 > lane.extents.length) {
        const more = new Float64Array(lane.extents.length * 2);
        more.set(lane.extents);
        lane.extents = more;
      }
      lane.extents[3 * n] = fd;
      lane.extents[3 * n + 1] = at;
      lane.extents[3 * n + 2] = length;
      n++;
    };
    const take = (store: ByteStore, at: number, length: number): boolean => {
      const fd = store.directFd?.(false);
      if (fd === undefined) return false;
      lane.stores.push(store);
      push(fd, at, length);
      return true;
    };
    for (const s of item.spans) {
      if (s.zero) {
        push(-1, 0, s.length);
        continue;
      }
      // Most spans are placed from what their layer knows now, without a promise; otherwise what
      // was pushed for the span is dropped and plainExtents decides.
      const [mark, stores] = [n, lane.stores.length];
      if (src.plainRunsNow(s.offset, s.length, s.depth, take)) continue;
      n = mark;
      lane.stores.length = stores;
      let covered = 0;
      for (const e of await src.plainExtents(s.offset, s.length, s.depth)) {
        const fd = e.store?.directFd?.(false);
        if (fd === undefined || e.hostOffset === undefined || e.offset !== s.offset + covered) return -1;
        lane.stores.push(e.store!);
        push(fd, e.hostOffset, e.length);
        covered += e.length;
      }
      if (covered !== s.length) return -1;
    }
    return n;
  }

  /**
   * Copy the item placed by `place` (`count` extents) through `buf`, then make zero what the
   * target must read as zeros and is not yet (-n into an existing file).
   */
  async run(item: CopyItem, count: number, buf: Uint8Array, lane: NativeLane): Promise<void> {
    let records: number;
    try {
      records = await this.copy(buf, lane.extents, count, this.fd, this.base + item.offset, item.length, this.unit, this.flags, lane.runs);
    } catch (e) {
      throw this.failure(e, lane);
    }
    const zeros: Promise<void>[] = [];
    for (let i = 0; i < records; i++) {
      const [kind, offset, length] = [lane.runs[3 * i]!, lane.runs[3 * i + 1]!, lane.runs[3 * i + 2]!];
      if (kind === 1) this.store.wroteDirectly?.(offset, length);
      else zeros.push(this.target.writeZeroes(offset - this.base, length, { mayUnmap: true }));
    }
    if (zeros.length) await Promise.all(zeros);
  }

  /** A failed read or write as the stores would report it: QCOW_IO naming the file. */
  private failure(e: unknown, lane: NativeLane): unknown {
    const err = e as { code?: string; syscall?: string; fd?: number; message?: string };
    if (typeof err?.code !== 'string') return e;
    const write = err.syscall === 'pwrite';
    const file = write ? this.store.name : (lane.stores.find((s) => s.directFd?.(false) === err.fd)?.name ?? this.store.name);
    // In node:fs's words ("ENOSPC: no space left on device, write"), as the TypeScript loop says it.
    const text = (err.message ?? '').replace(/^[A-Z0-9]+, /, '');
    const message = `${err.code}: ${text.charAt(0).toLowerCase()}${text.slice(1)}, ${write ? 'write' : 'read'}`;
    return new QcowError('QCOW_IO', message, { file, cause: e });
  }
}
