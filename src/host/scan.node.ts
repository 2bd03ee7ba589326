/**
 * The zero scan of copy buffers in native code, where the host addon has it (`#host-scan` on Node;
 * scan.browser.ts elsewhere). ops/zero-scan.ts asks once per run of blocks instead of once per
 * 4 KiB block: run by JavaScript, the per-block calls were the largest part of the JavaScript time
 * of a 1 GiB convert (~40 ms of ~120 ms, most of it in code V8 had not optimised yet, plus V8's
 * optimising compile of the loop).
 */
import { hostAddon, type HostAddon } from './native.node.js';

export type BlockRunEnd = NonNullable<HostAddon['blockRunEnd']>;

let scanner: BlockRunEnd | null | undefined;

/** The addon's blockRunEnd, or undefined without the addon (or QCOW_NO_NATIVE=1). */
export function nativeBlockRunEnd(): BlockRunEnd | undefined {
  if (scanner === undefined) scanner = hostAddon()?.blockRunEnd ?? null;
  return scanner ?? undefined;
}
