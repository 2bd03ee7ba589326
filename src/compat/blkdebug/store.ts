/**
 * QEMU's `blkdebug` driver as a ByteStore over an image's file: a format opened on it hears
 * nothing different, except that
 *   - the format's driver events (ByteStore.debugEvent) drive the rules: an event makes its
 *     inject-error rules active (the set of active rules is replaced by each event that has any)
 *     and its set-state rules move the state; rules with a state only act in that state;
 *   - each request is checked against the active rules in order: the first whose kind and sector
 *     match fails the request with its errno (and is dropped when `once`);
 *   - `align` widens every request to whole aligned blocks (writes read, modify and write back, as
 *     QEMU's block layer does for a node with that request alignment), and `max-transfer` splits
 *     them, so the requests the rules see are those QEMU's blkdebug would see.
 * The store starts in state 1 and hears the event `none` once it is open, as QEMU's does.
 */
import { QcowError, type ByteStore, type DataRun, type Permissions } from '../../node.js';
import type { BlkdebugRule, InjectErrorRule, IoType } from './rules.js';

export interface BlkdebugLimits {
  /** Request alignment in bytes (a power of two); 1 when not given. */
  align: number;
  /** Largest request in bytes; 0: no limit. */
  maxTransfer: number;
  /**
   * A raw format node sits on this one (an external data file given as raw over blkdebug): QEMU's
   * raw driver tells its file of each read and write (read_aio, write_aio), so this store does.
   */
  rawAbove?: boolean;
}

const ERRNO_TEXT: Record<string, string> = {
  EIO: 'Input/output error',
  ENOSPC: 'No space left on device',
  EINVAL: 'Invalid argument',
  EPERM: 'Operation not permitted',
  ENOENT: 'No such file or directory',
  EFBIG: 'File too large',
  ENOMEDIUM: 'No medium found',
  EACCES: 'Permission denied',
  ENOTSUP: 'Operation not supported',
  EBUSY: 'Device or resource busy',
};

/** The failure an injected error stands for: an OS error with that errno under a QcowError. */
function injected(rule: InjectErrorRule, name: string): QcowError {
  const text = ERRNO_TEXT[rule.errno] ?? `errno ${rule.errnoNumber}`;
  const cause = Object.assign(new Error(text), { code: rule.errno, errno: -rule.errnoNumber });
  return new QcowError('QCOW_IO', text, { file: name, errno: rule.errno, cause });
}

export class BlkdebugStore implements ByteStore {
  private state = 1;
  /** Rules by event, in the order QEMU keeps them (each new rule goes first). */
  private readonly byEvent = new Map<string, BlkdebugRule[]>();
  private active: InjectErrorRule[] = [];
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
    for (const r of rules) {
      const list = this.byEvent.get(r.event) ?? [];
      list.unshift(r);
      this.byEvent.set(r.event, list);
    }
    if (inner.zeroRange) this.zeroRange = async (o, l) => (this.check(o, l, 'write-zeroes'), inner.zeroRange!(o, l));
    if (inner.punchHole) this.punchHole = async (o, l) => (this.check(o, l, 'discard'), inner.punchHole!(o, l));
    if (inner.dataRuns) this.dataRuns = async (o, l) => (this.check(o, l, 'block-status'), inner.dataRuns!(o, l));
    if (inner.allocatedSize) this.allocatedSize = () => inner.allocatedSize!();
    if (inner.setPermissions) this.setPermissions = (p) => inner.setPermissions!(p);
    this.debugEvent('none');
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  debugEvent(event: string): void {
    const rules = this.byEvent.get(event);
    if (!rules) return;
    let next = this.state;
    let injecting = false;
    for (const r of rules) {
      if (r.state !== 0 && r.state !== this.state) continue;
      if (r.action === 'set-state') next = r.newState;
      else {
        // The first inject-error rule of an event replaces the active set; later ones join it in front.
        if (!injecting) this.active = [];
        injecting = true;
        this.active.unshift(r);
      }
    }
    this.state = next;
  }

  /** Fails the request when an active rule matches it (QEMU's rule_check). */
  private check(offset: number, bytes: number, type: IoType): void {
    if (this.active.length === 0) return;
    const rule = this.active.find((r) => r.ioTypes.has(type) && (r.offset === -1 || (bytes > 0 && r.offset >= offset && r.offset < offset + bytes)));
    if (!rule) return;
    if (rule.once) {
      this.active = this.active.filter((r) => r !== rule);
      this.dropRule(rule);
    }
    throw injected(rule, this.name);
  }

  private dropRule(rule: BlkdebugRule): void {
    const list = this.byEvent.get(rule.event);
    if (list) this.byEvent.set(rule.event, list.filter((r) => r !== rule));
  }

  async read(offset: number, into: Uint8Array): Promise<number> {
    if (this.limits.rawAbove) this.debugEvent('read_aio');
    const { align } = this.limits;
    const start = offset - (offset % align);
    const end = Math.ceil((offset + into.length) / align) * align;
    if (start === offset && end === offset + into.length) return this.readAligned(offset, into);
    const buf = new Uint8Array(end - start);
    const n = await this.readAligned(start, buf);
    into.set(buf.subarray(offset - start, offset - start + into.length));
    return Math.max(0, Math.min(into.length, n - (offset - start)));
  }

  private async readAligned(offset: number, into: Uint8Array): Promise<number> {
    let total = 0;
    for (const [at, len] of this.pieces(offset, into.length)) {
      this.check(at, len, 'read');
      total += await this.inner.read(at, into.subarray(at - offset, at - offset + len));
    }
    return total;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.limits.rawAbove) this.debugEvent('write_aio');
    const { align } = this.limits;
    const start = offset - (offset % align);
    const end = Math.ceil((offset + data.length) / align) * align;
    if (start === offset && end === offset + data.length) return this.writeAligned(offset, data);
    // Read-modify-write of the partial blocks at either end, as QEMU's block layer does.
    const buf = new Uint8Array(end - start);
    const head = start !== offset;
    if (head) await this.readAligned(start, buf.subarray(0, align));
    if (end !== offset + data.length && !(head && end - align === start)) await this.readAligned(end - align, buf.subarray(buf.length - align));
    buf.set(data, offset - start);
    await this.writeAligned(start, buf);
  }

  private async writeAligned(offset: number, data: Uint8Array): Promise<void> {
    for (const [at, len] of this.pieces(offset, data.length)) {
      this.check(at, len, 'write');
      await this.inner.write(at, data.subarray(at - offset, at - offset + len));
    }
  }

  /** [offset, length] pieces of a request no longer than max-transfer. */
  private pieces(offset: number, length: number): Array<[number, number]> {
    const max = this.limits.maxTransfer;
    if (max === 0 || length <= max) return [[offset, length]];
    const out: Array<[number, number]> = [];
    for (let at = offset; at < offset + length; at += max) out.push([at, Math.min(max, offset + length - at)]);
    return out;
  }

  truncate(size: number): Promise<void> {
    return this.inner.truncate(size);
  }

  async flush(): Promise<void> {
    this.check(0, 0, 'flush');
    await this.inner.flush();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
