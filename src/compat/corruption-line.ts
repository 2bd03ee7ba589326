/**
 * qcow2's line on standard error for a corruption event (OpenOptions.onCorruption), in QEMU's
 * words: "Marking image as corrupt" when the event marked the image (open read-write), "Image is
 * corrupt" for a non-fatal one. Both front ends print it as the event is signalled.
 */
import type { CorruptionEvent } from '../node.js';

export function corruptionLine(e: CorruptionEvent): string {
  return e.fatal
    ? `qcow2: Marking image as corrupt: ${e.message}; further corruption events will be suppressed\n`
    : `qcow2: Image is corrupt: ${e.message}; further non-fatal corruption events will be suppressed\n`;
}
