/**
 * blkdebug's rules at work (QEMU's blkdebug state machine): an event makes its inject-error rules
 * the active ones (the active set is replaced by each event that has any) and its set-state rules
 * move the state; a rule with a state acts only in that state. Each request is checked against the
 * active rules in order: the first whose kind of request and sector match fails it with its errno,
 * and is dropped when `once`. The state starts at 1; the event `none` comes once the node is open.
 */
import { QcowError } from '../../node.js';
import type { BlkdebugRule, InjectErrorRule, IoType } from './rules.js';

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
  ENOMEM: 'Cannot allocate memory',
  ERANGE: 'Numerical result out of range',
};

/** The failure an injected error stands for: an OS error with that errno under a QcowError. */
function injected(rule: InjectErrorRule, name: string): QcowError {
  const text = ERRNO_TEXT[rule.errno] ?? `Unknown error ${rule.errnoNumber}`;
  const cause = Object.assign(new Error(text), { code: rule.errno, errno: -rule.errnoNumber });
  return new QcowError('QCOW_IO', text, { file: name, errno: rule.errno, cause });
}

export class RuleState {
  private state = 1;
  /** Rules by event, in the order QEMU keeps them (each new rule goes first). */
  private readonly byEvent = new Map<string, BlkdebugRule[]>();
  private active: InjectErrorRule[] = [];

  constructor(
    rules: readonly BlkdebugRule[],
    /** The node's name, for the failures. */
    private readonly name: string,
  ) {
    for (const r of rules) {
      const list = this.byEvent.get(r.event) ?? [];
      list.unshift(r);
      this.byEvent.set(r.event, list);
    }
  }

  event(event: string): void {
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

  /** Throws the injected failure when an active rule matches the request (QEMU's rule_check). */
  check(offset: number, bytes: number, type: IoType): void {
    if (this.active.length === 0) return;
    const rule = this.active.find((r) => r.ioTypes.has(type) && (r.offset === -1 || (bytes > 0 && r.offset >= offset && r.offset < offset + bytes)));
    if (!rule) return;
    if (rule.once) {
      this.active = this.active.filter((r) => r !== rule);
      const list = this.byEvent.get(rule.event);
      if (list) this.byEvent.set(rule.event, list.filter((r) => r !== rule));
    }
    throw injected(rule, this.name);
  }
}
