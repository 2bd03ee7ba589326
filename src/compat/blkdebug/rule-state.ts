/**
 * blkdebug's rules at work (QEMU's blkdebug state machine): an event makes its inject-error rules
 * the active ones (the active set is replaced by each event that has any) and its set-state rules
 * move the state; a rule with a state acts only in that state. Each request is checked against the
 * active rules in order: the first whose kind of request and sector match fails it with its errno,
 * and is dropped when `once`. The state starts at 1; the event `none` comes once the node is open.
 *
 * Breakpoints (qemu-io's `break EVENT TAG`) are rules of a third kind, in the same lists: the
 * first request to reach the event is suspended (the event hands its driver a promise to wait
 * for) and the rule is gone; `resume TAG` lets the request go on.
 */
import { QcowError } from '../../node.js';
import type { Breakpoints } from './breakpoints.js';
import { BLKDEBUG_EVENTS, type BlkdebugRule, type InjectErrorRule, type IoType } from './rules.js';

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

/** A breakpoint: a rule that suspends the first request reaching its event. */
interface SuspendRule {
  action: 'suspend';
  event: string;
  tag: string;
}

/** A request suspended at a breakpoint, and how to let it go on. */
interface Suspended {
  tag: string;
  resume(): void;
}

export class RuleState implements Breakpoints {
  private state = 1;
  /** Rules by event, in the order QEMU keeps them (each new rule goes first). */
  private readonly byEvent = new Map<string, Array<BlkdebugRule | SuspendRule>>();
  private active: InjectErrorRule[] = [];
  /** Requests suspended at breakpoints, the newest first (as QEMU lists them). */
  private suspended: Suspended[] = [];
  /** Told of each suspension (wait_break waits for one). */
  private readonly suspensionWaiters: Array<() => void> = [];
  /** Where the lines QEMU's blkdebug prints go (qemu-io sets it to its output). */
  say: (line: string) => void = () => undefined;

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

  /**
   * A driver event: the rules on it act. Returns a promise when a breakpoint suspended the
   * request (it resolves once every breakpoint that fired has been resumed); otherwise nothing.
   */
  event(event: string): Promise<void> | undefined {
    const rules = this.byEvent.get(event);
    if (!rules) return undefined;
    let next = this.state;
    let injecting = false;
    let held: Array<Promise<void>> | undefined;
    for (const r of [...rules]) {
      if (r.action === 'suspend') {
        (held ??= []).push(this.suspend(r));
        continue;
      }
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
    if (!held) return undefined;
    return held.length === 1 ? held[0] : Promise.all(held).then(() => undefined);
  }

  /** The request at `rule`'s event waits for `resume` of its tag; the rule is used up. */
  private suspend(rule: SuspendRule): Promise<void> {
    this.dropRule(rule);
    return new Promise<void>((resume) => {
      this.suspended.unshift({ tag: rule.tag, resume });
      this.say(`blkdebug: Suspended request '${rule.tag}'\n`);
      for (const wake of this.suspensionWaiters.splice(0)) wake();
    });
  }

  private dropRule(rule: BlkdebugRule | SuspendRule): void {
    const list = this.byEvent.get(rule.event);
    if (list) this.byEvent.set(rule.event, list.filter((r) => r !== rule));
  }

  breakpoint(event: string, tag: string): boolean {
    if (!(BLKDEBUG_EVENTS as readonly string[]).includes(event)) return false;
    const list = this.byEvent.get(event) ?? [];
    list.unshift({ action: 'suspend', event, tag });
    this.byEvent.set(event, list);
    return true;
  }

  removeBreakpoint(tag: string): boolean {
    let found = false;
    for (const list of this.byEvent.values()) {
      for (const r of list) {
        if (r.action === 'suspend' && r.tag === tag) {
          this.dropRule(r);
          found = true;
        }
      }
    }
    // Requests already suspended with the tag go on, all of them (each said, as QEMU does); only
    // a breakpoint removed makes this succeed (QEMU's resume-all never reports success).
    while (this.resume(tag));
    return found;
  }

  resume(tag: string): boolean {
    const i = this.suspended.findIndex((r) => r.tag === tag);
    if (i < 0) return false;
    const [r] = this.suspended.splice(i, 1);
    this.say(`blkdebug: Resuming request '${tag}'\n`);
    r!.resume();
    return true;
  }

  isSuspended(tag: string): boolean {
    return this.suspended.some((r) => r.tag === tag);
  }

  nextSuspension(): Promise<void> {
    return new Promise((wake) => this.suspensionWaiters.push(wake));
  }

  resumeAll(): void {
    for (const r of this.suspended.splice(0)) r.resume();
  }

  /** Throws the injected failure when an active rule matches the request (QEMU's rule_check). */
  check(offset: number, bytes: number, type: IoType): void {
    if (this.active.length === 0) return;
    const rule = this.active.find((r) => r.ioTypes.has(type) && (r.offset === -1 || (bytes > 0 && r.offset >= offset && r.offset < offset + bytes)));
    if (!rule) return;
    if (rule.once) {
      this.active = this.active.filter((r) => r !== rule);
      this.dropRule(rule);
    }
    throw injected(rule, this.name);
  }
}
