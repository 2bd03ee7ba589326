/**
 * QEMU's `blkdebug` driver above a format (`driver=blkdebug,image.driver=qcow2`): a filter device
 * whose requests reach the image shaped by `align` and `max-transfer` (requests.ts) and checked
 * against the rules (rule-state.ts). No driver sits above it to tell it of events, so only rules
 * on the event `none` (heard at open) can become active. Everything else is the image's.
 */
import { DeviceBase, QcowError, type BlockDevice, type BlockExtent, type ImageDescription, type WriteOptions, type ZeroOptions } from '../../node.js';
import { DeviceStore } from '../qemu-io/device-store.js';
import type { BlkdebugRule } from './rules.js';
import { RuleState } from './rule-state.js';
import type { Breakpoints } from './breakpoints.js';
import { alignedRead, alignedWrite, type AlignedIo } from './requests.js';
import type { BlkdebugLimits } from './store.js';

export const BLKDEBUG_FORMAT = 'blkdebug';
/** QEMU's largest bounce buffer for writes of zeros (MAX_BOUNCE_BUFFER). */
const BOUNCE_MAX = 32768 * 512;

class BlkdebugDevice extends DeviceBase {
  readonly format = BLKDEBUG_FORMAT;
  readonly clusterSize: number;
  private readonly rules: RuleState;
  private readonly io: AlignedIo;
  /** Written since the last flush that succeeded (see BlkdebugStore.unflushed). */
  private unflushed = false;

  constructor(private readonly inner: BlockDevice, rules: readonly BlkdebugRule[], private readonly limits: BlkdebugLimits, name: string) {
    super(new DeviceStore(inner), inner.size, inner.readOnly);
    this.clusterSize = inner.clusterSize;
    // A filter: the image's backing chain is the chain below it (closing it twice does nothing).
    this.backing = inner.backing;
    const state = (this.rules = new RuleState(rules, name));
    this.io = {
      align: limits.align,
      maxTransfer: limits.maxTransfer,
      readPiece: (at, into) => {
        state.check(at, into.length, 'read');
        return inner.read(at, into);
      },
      writePiece: (at, data, options) => {
        this.unflushed = true;
        state.check(at, data.length, 'write');
        return inner.write(at, data, options as WriteOptions);
      },
    };
    // Events raised on this node (copy-on-read's cor_write) reach the rules through its store.
    this.store.debugEvent = (event) => state.event(event);
    state.event('none');
  }
  /** Breakpoints can be set here, but no driver above tells this node of events: none fires. */
  get breakpoints(): Breakpoints {
    return this.rules;
  }
  override get unusable(): Error | undefined {
    return this.inner.unusable;
  }
  protected doRead(offset: number, into: Uint8Array): Promise<void> {
    return alignedRead(this.io, offset, into);
  }
  protected doWrite(offset: number, data: Uint8Array, options: WriteOptions): Promise<void> {
    return alignedWrite(this.io, offset, data, options);
  }
  /**
   * QEMU's block layer cuts a write-zeroes request at the node's write-zeroes alignment (and its
   * largest size); blkdebug refuses the pieces shorter than that alignment, and the block layer
   * writes buffers of zeros there instead (so those become data, not zero clusters).
   */
  protected override async doWriteZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    this.unflushed = true;
    const { align, maxTransfer } = this.io;
    const alignment = Math.max(this.limits.optWriteZero ?? 0, align);
    const maxZero = Math.floor((this.limits.maxWriteZero || Number.MAX_SAFE_INTEGER) / alignment) * alignment;
    const transfer = Math.min(maxTransfer || BOUNCE_MAX, BOUNCE_MAX);
    let head = offset % alignment;
    const tail = (offset + length) % alignment;
    while (length > 0) {
      let num = length;
      if (head) {
        num = Math.min(length, transfer, alignment - head);
        head = (head + num) % alignment;
      } else if (tail && num > alignment) num -= tail;
      num = Math.min(num, maxZero);
      if (num >= alignment) {
        this.rules.check(offset, num, 'write-zeroes');
        await this.inner.writeZeroes(offset, num, options);
      } else {
        if (options.fastOnly) throw new QcowError('QCOW_UNSUPPORTED', 'blkdebug: write zeroes shorter than its alignment');
        num = Math.min(num, transfer);
        await this.io.writePiece(offset, new Uint8Array(num), options);
      }
      offset += num;
      length -= num;
    }
  }
  protected override async doDiscard(offset: number, length: number): Promise<void> {
    this.unflushed = true;
    this.rules.check(offset, length, 'discard');
    await this.inner.discard(offset, length);
  }
  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    this.rules.check(offset, length, 'block-status');
    return this.inner.blockStatus(offset, length);
  }
  async describe(): Promise<ImageDescription> {
    return this.inner.describe();
  }
  async flush(): Promise<void> {
    if (!this.unflushed) return this.inner.flush();
    this.rules.check(0, 0, 'flush');
    await this.inner.flush();
    this.unflushed = false;
  }
  protected async doClose(): Promise<void> {
    await this.inner.close();
  }
}

/** The filter over `inner` (closed with it). */
export function blkdebugFilter(inner: BlockDevice, rules: readonly BlkdebugRule[], limits: BlkdebugLimits, name: string): BlockDevice {
  return new BlkdebugDevice(inner, rules, limits, name);
}
