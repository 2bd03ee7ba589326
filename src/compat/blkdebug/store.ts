/**
 * QEMU's `blkdebug` driver as a ByteStore over an image's file: a format opened on it hears
 * nothing different, except that its driver events (ByteStore.debugEvent) drive the rules
 * (rule-state.ts), whose injected errors fail the requests they match, and that `align` and
 * `max-transfer` shape the requests as QEMU's block layer shapes them for such a node
 * (requests.ts), so the rules see the requests QEMU's blkdebug would see.
 */
import type { ByteStore, DataRun, Permissions } from '../../node.js';
import type { BlkdebugRule } from './rules.js';
import { RuleState } from './rule-state.js';
import type { Breakpoints } from './breakpoints.js';
import { alignedRead, alignedWrite, type AlignedIo } from './requests.js';

export interface BlkdebugLimits {
  /** Request alignment in bytes (a power of two); 1 when not given. */
  align: number;
  /** Largest request in bytes; 0: no limit. */
  maxTransfer: number;
  /** Write-zeroes alignment (opt-write-zero) and largest write-zeroes request (max-write-zero); 0: none. */
  optWriteZero?: number;
  maxWriteZero?: number;
  /**
   * A raw format node sits on this one (an external data file given as raw over blkdebug): QEMU's
   * raw driver tells its file of each read and write (read_aio, write_aio), so this store does.
   */
  rawAbove?: boolean;
}

export class BlkdebugStore implements ByteStore {
  private readonly rules: RuleState;
  private readonly io: AlignedIo;
  /**
   * Written (or tried to) since the last flush that succeeded: QEMU's block layer passes a flush
   * to the node only then (write_gen against flushed_gen), so only then can a rule fail it.
   */
  private unflushed = false;
  zeroRange?: (offset: number, length: number) => Promise<void>;
  punchHole?: (offset: number, length: number) => Promise<void>;
  dataRuns?: (offset: number, length: number) => Promise<DataRun[]>;
  allocatedSize?: () => Promise<number>;
  setPermissions?: (p: Permissions) => void;

  constructor(
    private readonly inner: ByteStore,
    rules: readonly BlkdebugRule[],
    private readonly limits: BlkdebugLimits,
    readonly name: string = inner.name,
  ) {
    const state = (this.rules = new RuleState(rules, name));
    this.io = {
      align: limits.align,
      maxTransfer: limits.maxTransfer,
      readPiece: async (at, into) => {
        state.check(at, into.length, 'read');
        await inner.read(at, into);
      },
      writePiece: (at, data) => {
        this.unflushed = true;
        state.check(at, data.length, 'write');
        return inner.write(at, data);
      },
    };
    if (inner.zeroRange) this.zeroRange = async (o, l) => ((this.unflushed = true), state.check(o, l, 'write-zeroes'), inner.zeroRange!(o, l));
    if (inner.punchHole) this.punchHole = async (o, l) => ((this.unflushed = true), state.check(o, l, 'discard'), inner.punchHole!(o, l));
    if (inner.dataRuns) this.dataRuns = async (o, l) => (state.check(o, l, 'block-status'), inner.dataRuns!(o, l));
    if (inner.allocatedSize) this.allocatedSize = () => inner.allocatedSize!();
    if (inner.setPermissions) this.setPermissions = (p) => inner.setPermissions!(p);
    state.event('none');
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  /** qemu-io's break/resume/wait_break act here (a request is suspended at its driver's event). */
  get breakpoints(): Breakpoints {
    return this.rules;
  }

  debugEvent(event: string): Promise<void> | undefined {
    return this.rules.event(event);
  }

  async read(offset: number, into: Uint8Array): Promise<number> {
    if (this.limits.rawAbove) await this.rules.event('read_aio');
    await alignedRead(this.io, offset, into);
    // Bytes past the end read as zeros (the inner store's rule): count those that were in the file.
    return Math.max(0, Math.min(into.length, (await this.inner.size()) - offset));
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.limits.rawAbove) await this.rules.event('write_aio');
    await alignedWrite(this.io, offset, data);
  }

  truncate(size: number): Promise<void> {
    this.unflushed = true;
    return this.inner.truncate(size);
  }

  async flush(): Promise<void> {
    if (!this.unflushed) return;
    this.rules.check(0, 0, 'flush');
    await this.inner.flush();
    this.unflushed = false;
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
