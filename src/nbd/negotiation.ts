/**
 * Option haggling: given the state so far and one option from the client, the replies to send
 * and what happens next. No sockets here; the connection writes the replies and switches phase.
 */
import {
  BASE_ALLOCATION,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  QEMU_DIRTY_BITMAP_PREFIX,
} from './constants.js';
import { blockSizes, transmissionFlags, type NbdExport } from './export.js';
import { decodeInfoRequest, decodeMetaContextRequest, type ClientOption } from './messages.js';
import * as out from './serializer.js';
import { decodeUtf8 } from './wire.js';

/** The id we give base:allocation in NBD_REP_META_CONTEXT (any value unique per connection works). */
export const BASE_ALLOCATION_ID = 1;
/** The id of the export's qemu:dirty-bitmap:NAME context. */
export const DIRTY_BITMAP_ID = 2;

export interface NegotiationState {
  /** The client asked for NBD_FLAG_C_NO_ZEROES. */
  noZeroes: boolean;
  structuredReplies: boolean;
  /** The last NBD_OPT_SET_META_CONTEXT: for which export, and which contexts it selected. */
  metaContext?: { exportName: string; baseAllocation: boolean; dirtyBitmap: boolean };
}

export interface OptionOutcome {
  replies: Uint8Array[];
  /** continue haggling; enter transmission with `exp`; or drop the connection after the replies. */
  next: 'continue' | 'transmission' | 'close';
}

export function newNegotiationState(noZeroes: boolean): NegotiationState {
  return { noZeroes, structuredReplies: false };
}

/** What the connection needs in transmission: whether base:allocation is active for this export. */
export function baseAllocationSelected(state: NegotiationState, exp: NbdExport): boolean {
  return !!state.metaContext && state.metaContext.baseAllocation && state.metaContext.exportName === exp.name && state.structuredReplies;
}

/** Whether the export's qemu:dirty-bitmap context is active. */
export function dirtyBitmapSelected(state: NegotiationState, exp: NbdExport): boolean {
  return !!state.metaContext && state.metaContext.dirtyBitmap && !!exp.dirtyBitmap && state.metaContext.exportName === exp.name && state.structuredReplies;
}

export function handleOption(state: NegotiationState, opt: ClientOption, exp: NbdExport, shuttingDown = false): OptionOutcome {
  const { option } = opt;
  const reply = (...replies: Uint8Array[]): OptionOutcome => ({ replies, next: 'continue' });
  const fail = (type: number, message: string): OptionOutcome => reply(out.optionError(option, type, message));

  if (opt.data === undefined) {
    // Too long to keep. EXPORT_NAME has no error reply, so that one ends the session.
    if (option === NBD_OPT_EXPORT_NAME) return { replies: [], next: 'close' };
    return fail(NBD_REP_ERR_TOO_BIG, `option ${option} is too long (${opt.length} bytes)`);
  }
  const data = opt.data;
  if (option === NBD_OPT_ABORT) return { replies: [out.optionReply(option, NBD_REP_ACK)], next: 'close' };
  if (shuttingDown) {
    if (option === NBD_OPT_EXPORT_NAME) return { replies: [], next: 'close' };
    return fail(NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
  }

  switch (option) {
    case NBD_OPT_EXPORT_NAME: {
      if (decodeUtf8(data) !== exp.name) return { replies: [], next: 'close' };
      return { replies: [out.exportNameReply(exp.device.size, transmissionFlags(exp, state.structuredReplies), state.noZeroes)], next: 'transmission' };
    }
    case NBD_OPT_LIST:
      if (data.length !== 0) return fail(NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
      return reply(out.serverReply(option, exp.name, exp.description), out.optionReply(option, NBD_REP_ACK));
    case NBD_OPT_INFO:
    case NBD_OPT_GO: {
      const req = decodeInfoRequest(data);
      if (!req.ok) return fail(NBD_REP_ERR_INVALID, req.reason);
      if (req.value.name !== exp.name) return fail(NBD_REP_ERR_UNKNOWN, `export '${req.value.name}' not present`);
      const replies = [out.infoExport(option, exp.device.size, transmissionFlags(exp, state.structuredReplies))];
      if (req.value.infos.includes(NBD_INFO_NAME)) replies.push(out.infoName(option, exp.name));
      if (req.value.infos.includes(NBD_INFO_DESCRIPTION) && exp.description) replies.push(out.infoDescription(option, exp.description));
      // Sent whether asked or not, as qemu-nbd does; our constraints are the defaults anyway.
      replies.push(out.infoBlockSize(option, blockSizes(exp)));
      replies.push(out.optionReply(option, NBD_REP_ACK));
      return { replies, next: option === NBD_OPT_GO ? 'transmission' : 'continue' };
    }
    case NBD_OPT_STRUCTURED_REPLY:
      if (data.length !== 0) return fail(NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
      if (state.structuredReplies) return fail(NBD_REP_ERR_INVALID, 'structured replies are already negotiated');
      state.structuredReplies = true;
      return reply(out.optionReply(option, NBD_REP_ACK));
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
      return metaContext(state, option, data, exp);
    case NBD_OPT_STARTTLS:
      return fail(NBD_REP_ERR_POLICY, 'TLS is not available on this server');
    default:
      return fail(NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
  }
}

function metaContext(state: NegotiationState, option: number, data: Uint8Array, exp: NbdExport): OptionOutcome {
  const set = option === NBD_OPT_SET_META_CONTEXT;
  // A SET replaces the previous selection even when it fails.
  if (set) state.metaContext = undefined;
  const fail = (type: number, message: string): OptionOutcome => ({ replies: [out.optionError(option, type, message)], next: 'continue' });
  if (!state.structuredReplies) return fail(NBD_REP_ERR_INVALID, 'structured replies must be negotiated first');
  const req = decodeMetaContextRequest(data);
  if (!req.ok) return fail(NBD_REP_ERR_INVALID, req.reason);
  if (req.value.name !== exp.name) return fail(NBD_REP_ERR_UNKNOWN, `export '${req.value.name}' not present`);

  const qs = req.value.queries;
  let selected: boolean;
  if (set) selected = qs.includes(BASE_ALLOCATION);
  // Listing: no query lists everything; 'base:' is the namespace wildcard.
  else selected = qs.length === 0 || qs.some((q) => q === BASE_ALLOCATION || q === 'base:');
  // The bitmap's context, as qemu-nbd names it; listing accepts the 'qemu:' and
  // 'qemu:dirty-bitmap:' wildcards too.
  const bitmapContext = exp.dirtyBitmap ? QEMU_DIRTY_BITMAP_PREFIX + exp.dirtyBitmap.name : undefined;
  const bitmap = bitmapContext !== undefined && (set ? qs.includes(bitmapContext) : qs.length === 0 || qs.some((q) => q === bitmapContext || q === 'qemu:' || q === QEMU_DIRTY_BITMAP_PREFIX));

  const replies: Uint8Array[] = [];
  if (selected) replies.push(out.metaContextReply(option, set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION));
  if (bitmap) replies.push(out.metaContextReply(option, set ? DIRTY_BITMAP_ID : 0, bitmapContext!));
  replies.push(out.optionReply(option, NBD_REP_ACK));
  if (set) state.metaContext = { exportName: exp.name, baseAllocation: selected, dirtyBitmap: bitmap };
  return { replies, next: 'continue' };
}
