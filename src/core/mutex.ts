/**
 * A FIFO async lock: metadata updates that must not interleave run under one.
 *
 * Callers may say a run may be overtaken (`run(fn, true)`): a step that never suspends (no await
 * between its first and last change) may then go before it, without a turn of the lock, when the
 * owner knows no holder is in the middle of its changes and no one waits for a turn it would
 * jump (the qcow2 writer's batches of guest writes: once a batch is served, a write that comes
 * before its run has ended need not wait for it). `mayOvertake` says whether every holder and
 * waiter agreed.
 */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();
  /** Holders and waiters that may not be overtaken. */
  private blocking = 0;
  /** One function for every run (a pair of fresh closures per call was garbage per request). */
  private readonly settledBlocking = (): void => {
    this.blocking--;
  };
  private readonly settledOvertakable = (): void => {};

  /** Every holder and waiter may be overtaken (none at all, say). */
  get mayOvertake(): boolean {
    return this.blocking === 0;
  }

  /**
   * Run `fn` once every earlier holder has finished; errors propagate to this caller only. With
   * `overtakable`, steps that never suspend may run before `fn` (see above).
   */
  run<T>(fn: () => Promise<T> | T, overtakable = false): Promise<T> {
    if (!overtakable) this.blocking++;
    const result = this.tail.then(fn);
    const settled = overtakable ? this.settledOvertakable : this.settledBlocking;
    this.tail = result.then(settled, settled);
    return result;
  }
}
