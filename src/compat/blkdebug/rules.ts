/**
 * QEMU's blkdebug rules: what its config file (`[inject-error]` and `[set-state]` sections of
 * `key = "value"` lines) and its options (`inject-error.0.event=...`, from a json: name's
 * arrays) say, parsed into plain rule records. The names of the events are those of QEMU 7.2's
 * BlkdebugEvent; which of them qcow's drivers emit is up to the drivers (ByteStore.debugEvent).
 */
import { QcowError } from '../../node.js';

/** QEMU 7.2's blkdebug event names (QAPI BlkdebugEvent), in its order. */
export const BLKDEBUG_EVENTS = [
  'l1_update', 'l1_grow_alloc_table', 'l1_grow_write_table', 'l1_grow_activate_table',
  'l2_load', 'l2_update', 'l2_update_compressed', 'l2_alloc_cow_read', 'l2_alloc_write',
  'read_aio', 'read_backing_aio', 'read_compressed', 'write_aio', 'write_compressed',
  'vmstate_load', 'vmstate_save', 'cow_read', 'cow_write',
  'reftable_load', 'reftable_grow', 'reftable_update',
  'refblock_load', 'refblock_update', 'refblock_update_part', 'refblock_alloc', 'refblock_alloc_hookup',
  'refblock_alloc_write', 'refblock_alloc_write_blocks', 'refblock_alloc_write_table', 'refblock_alloc_switch_table',
  'cluster_alloc', 'cluster_alloc_bytes', 'cluster_free', 'flush_to_os', 'flush_to_disk',
  'pwritev_rmw_head', 'pwritev_rmw_after_head', 'pwritev_rmw_tail', 'pwritev_rmw_after_tail',
  'pwritev', 'pwritev_zero', 'pwritev_done', 'empty_image_prepare',
  'l1_shrink_write_table', 'l1_shrink_free_l2_clusters', 'cor_write', 'cluster_alloc_space', 'none',
] as const;

/** The kinds of request an error can be injected into (QAPI BlkdebugIOType). */
export const IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
export type IoType = (typeof IO_TYPES)[number];
/** Without `iotype`, a rule fails every kind but block status. */
const DEFAULT_IO_TYPES: readonly IoType[] = ['read', 'write', 'write-zeroes', 'discard', 'flush'];

export interface InjectErrorRule {
  action: 'inject-error';
  event: string;
  /** Only while blkdebug is in this state; 0: any state. */
  state: number;
  /** The errno's name (EIO, ENOSPC...). */
  errno: string;
  /** The errno's number, as given. */
  errnoNumber: number;
  once: boolean;
  immediately: boolean;
  /** Only requests covering this byte (sector * 512); -1: any request. */
  offset: number;
  ioTypes: ReadonlySet<IoType>;
}

export interface SetStateRule {
  action: 'set-state';
  event: string;
  state: number;
  newState: number;
}

export type BlkdebugRule = InjectErrorRule | SetStateRule;

const invalid = (message: string) => new QcowError('QCOW_INVALID_ARGUMENT', message);

const KEYS: Record<BlkdebugRule['action'], readonly string[]> = {
  'inject-error': ['event', 'state', 'iotype', 'errno', 'sector', 'once', 'immediately'],
  'set-state': ['event', 'state', 'new_state'],
};

/** One section's key/value pairs, as written. */
export interface RuleGroup {
  action: BlkdebugRule['action'];
  values: Record<string, string>;
}

/**
 * A config file's sections. QEMU reads each line as `[group]`, `[group "id"]` or
 * `key = "value"` (the value always quoted); `#` starts a comment line.
 */
export function parseConfigText(text: string, file: string): RuleGroup[] {
  const groups: RuleGroup[] = [];
  let current: RuleGroup | undefined;
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, '');
    const where = `${file}:${i + 1}`;
    if (/^\s*(#.*)?$/.test(line)) continue;
    const head = /^\[([^\]"\s]+)(?:\s+"[^"]*")?\]/.exec(line);
    if (head) {
      const action = head[1]!;
      if (action !== 'inject-error' && action !== 'set-state') throw invalid(`${where}: There is no option group '${action}'`);
      current = { action, values: {} };
      groups.push(current);
      continue;
    }
    const kv = /^\s*(\S+?)\s*=\s*"([^"]*)"/.exec(line);
    if (!kv) throw invalid(`${where}: parse error`);
    if (!current) throw invalid(`${where}: no group defined`);
    if (!KEYS[current.action].includes(kv[1]!)) throw invalid(`${where}: Invalid parameter '${kv[1]}'`);
    current.values[kv[1]!] = kv[2]!;
  }
  return groups;
}

/** The rule groups among a node's dotted options (`inject-error.0.event`, or one group as `inject-error.event`). */
export function optionGroups(options: Record<string, string>): RuleGroup[] {
  const out: RuleGroup[] = [];
  for (const action of ['inject-error', 'set-state'] as const) {
    const byIndex = new Map<string, Record<string, string>>();
    for (const [k, v] of Object.entries(options)) {
      if (!k.startsWith(action + '.')) continue;
      const rest = k.slice(action.length + 1);
      const m = /^(\d+)\.(.+)$/.exec(rest);
      const [index, key] = m ? [m[1]!, m[2]!] : ['', rest];
      if (!KEYS[action].includes(key)) throw invalid(`Invalid parameter '${key}'`);
      let g = byIndex.get(index);
      if (!g) byIndex.set(index, (g = {}));
      g[key] = v;
    }
    const order = [...byIndex.keys()].sort((a, b) => Number(a || 0) - Number(b || 0));
    for (const i of order) out.push({ action, values: byIndex.get(i)! });
  }
  return out;
}

function number(values: Record<string, string>, key: string, fallback: number): number {
  const v = values[key];
  if (v === undefined) return fallback;
  if (!/^-?(0x[0-9a-f]+|\d+)$/i.test(v.trim())) throw invalid(`Parameter '${key}' expects a number`);
  return Number(v.trim());
}

function bool(values: Record<string, string>, key: string): boolean {
  const v = values[key];
  if (v === undefined) return false;
  if (['on', 'yes', 'true', 'y'].includes(v)) return true;
  if (['off', 'no', 'false', 'n'].includes(v)) return false;
  throw invalid(`Parameter '${key}' expects 'on' or 'off'`);
}

/**
 * errno names by number: QEMU's `errno` option is the host's number, Linux's here (node:os is
 * kept out of the front ends' start-up).
 */
const ERRNO_NAMES = new Map<number, string>([
  [1, 'EPERM'], [2, 'ENOENT'], [5, 'EIO'], [12, 'ENOMEM'], [13, 'EACCES'], [16, 'EBUSY'], [22, 'EINVAL'],
  [27, 'EFBIG'], [28, 'ENOSPC'], [34, 'ERANGE'], [95, 'ENOTSUP'], [123, 'ENOMEDIUM'],
]);
const EIO = 5;

/** A group's rule; fails as QEMU fails on a missing or unknown event or a bad iotype. */
export function ruleOf(g: RuleGroup): BlkdebugRule {
  const event = g.values.event;
  if (event === undefined) throw invalid('Missing event name for rule');
  if (!(BLKDEBUG_EVENTS as readonly string[]).includes(event)) throw invalid(`Invalid parameter '${event}'`);
  const state = number(g.values, 'state', 0);
  if (g.action === 'set-state') return { action: 'set-state', event, state, newState: number(g.values, 'new_state', 0) };
  const errnoNumber = number(g.values, 'errno', EIO);
  const iotype = g.values.iotype;
  if (iotype !== undefined && !(IO_TYPES as readonly string[]).includes(iotype)) throw invalid(`Parameter 'iotype' does not accept value '${iotype}'`);
  const sector = number(g.values, 'sector', -1);
  return {
    action: 'inject-error',
    event,
    state,
    errno: ERRNO_NAMES.get(errnoNumber) ?? 'EIO',
    errnoNumber,
    once: bool(g.values, 'once'),
    immediately: bool(g.values, 'immediately'),
    offset: sector === -1 ? -1 : sector * 512,
    ioTypes: new Set(iotype === undefined ? DEFAULT_IO_TYPES : [iotype as IoType]),
  };
}
