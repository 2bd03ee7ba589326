/**
 * A gate for tests that hold an operation in flight: the held operation calls `pass()`, which
 * notes its arrival (`reached` resolves) and waits until the test calls `open()`.
 */
export class Gate {
  /** Resolves when the first operation has arrived at the gate. */
  readonly reached: Promise<void>;
  private readonly opened: Promise<void>;
  private arrive!: () => void;
  private openIt!: () => void;

  constructor() {
    this.opened = new Promise((r) => (this.openIt = r));
    this.reached = new Promise((r) => (this.arrive = r));
  }

  /** Called by the held operation: arrive, then wait until open(). */
  async pass(): Promise<void> {
    this.arrive();
    await this.opened;
  }

  /** Let every operation at the gate, and every later one, through. */
  open(): void {
    this.openIt();
  }
}
