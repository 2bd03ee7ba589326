/**
 * Ordering of one client's concurrent requests. Requests run at once unless they conflict with an
 * earlier one still running:
 *   - a write (WRITE, WRITE_ZEROES, TRIM) waits for earlier requests that overlap it, so
 *     overlapping writes land in the order they were sent and a read never sees half of a write;
 *   - a read waits for earlier overlapping writes;
 *   - a flush waits for every earlier write, so it covers all writes sent before it.
 * Replies may still complete out of order; that is what the protocol allows.
 */
export type AccessKind = 'read' | 'write' | 'flush';

interface Pending {
  kind: AccessKind;
  start: number;
  end: number;
  settled: Promise<unknown>;
}

const SETTLED: Promise<unknown> = Promise.resolve();

export class RequestOrder {
  private readonly pending = new Set<Pending>();

  /** Requests started and not yet finished. */
  get size(): number {
    return this.pending.size;
  }

  /** Run `fn` once the earlier requests it conflicts with have finished. */
  run<T>(kind: AccessKind, offset: number, length: number, fn: () => Promise<T>): Promise<T> {
    const entry: Pending = { kind, start: offset, end: offset + length, settled: Promise.resolve() };
    const waits: Promise<unknown>[] = [];
    for (const p of this.pending) if (conflicts(p, entry)) waits.push(p.settled);
    const result = (waits.length ? Promise.all(waits) : Promise.resolve()).then(fn);
    entry.settled = result.then(
      () => this.pending.delete(entry),
      () => this.pending.delete(entry),
    );
    this.pending.add(entry);
    return result;
  }

  /**
   * Whether run() would hold a request of this kind back now, behind an earlier one it conflicts
   * with. When not, the caller may do the request at once, synchronously, in run()'s place: it
   * is then finished before anything later is looked at, so nothing later need wait for it.
   */
  wouldWait(kind: AccessKind, offset: number, length: number): boolean {
    if (this.pending.size === 0) return false;
    const entry: Pending = { kind, start: offset, end: offset + length, settled: SETTLED };
    for (const p of this.pending) if (conflicts(p, entry)) return true;
    return false;
  }

  /** Resolves when everything started so far has finished. */
  async idle(): Promise<void> {
    while (this.pending.size) await Promise.all([...this.pending].map((p) => p.settled));
  }
}

function conflicts(earlier: Pending, later: Pending): boolean {
  if (later.kind === 'flush') return earlier.kind === 'write';
  if (earlier.kind === 'flush') return false;
  if (earlier.kind === 'read' && later.kind === 'read') return false;
  return earlier.start < later.end && later.start < earlier.end;
}
