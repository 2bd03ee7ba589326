/**
 * What qemu-io's `break`, `remove_break`, `resume` and `wait_break` ask of a blkdebug node (QEMU's
 * bdrv_debug_breakpoint and friends). A node that has breakpoints (BlkdebugStore under a format,
 * the blkdebug filter above one) exposes this as its `breakpoints`; the front end finds it there
 * without loading the blkdebug modules for images that have none.
 */
export interface Breakpoints {
  /** Where "blkdebug: Suspended request 'TAG'" and "Resuming" lines go (QEMU prints them on stdout). */
  say: (line: string) => void;
  /** Suspend the next request reaching `event` as `tag`; false for an event QEMU does not know. */
  breakpoint(event: string, tag: string): boolean;
  /** Drop the breakpoints tagged `tag` and resume its suspended requests; false when no breakpoint was dropped. */
  removeBreakpoint(tag: string): boolean;
  /** Let the newest request suspended as `tag` go on; false when none is. */
  resume(tag: string): boolean;
  isSuspended(tag: string): boolean;
  /** Resolves at the next suspension of any request. */
  nextSuspension(): Promise<void>;
  /** Let every suspended request go on, unsaid (the image is being closed). */
  resumeAll(): void;
}

/** The breakpoints of a device or store that has them. */
export function breakpointsOf(node: unknown): Breakpoints | undefined {
  return (node as { breakpoints?: Breakpoints } | null | undefined)?.breakpoints;
}
