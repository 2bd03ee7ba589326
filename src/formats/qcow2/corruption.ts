/**
 * How an open qcow2 image tells the corruption events it runs into, as QEMU's
 * qcow2_signal_corruption does: a fatal event (the image open read-write) marks the image corrupt
 * (the writer does that, write.ts markCorrupt) and is told once; later events of the session are
 * then suppressed. A non-fatal event (read-only images, or a corruption the driver can step over,
 * such as a cluster it cannot free) is told the first time of the session only, and does not keep
 * a later fatal one from being told. The listener is OpenOptions.onCorruption.
 */
import type { CorruptionEvent } from '../../core/errors.js';

export class CorruptionSignals {
  /** Whether an event was signalled this session (QEMU's signaled_corruption). */
  private signaled = false;
  /** OpenOptions.onCorruption: told each event that is not suppressed, as it is signalled. */
  listener: ((event: CorruptionEvent) => void) | undefined;

  /** `e` marked the image corrupt (fatal): told unless the image was already marked. */
  marked(e: CorruptionEvent): void {
    e.fatal = true;
    this.tell(e);
  }

  /** `e` came after the image was marked corrupt: suppressed, as every later event. */
  afterMarked(e: CorruptionEvent): void {
    e.suppressed = true;
    this.signaled = true;
  }

  /** `e` is non-fatal: told if it is the session's first event. */
  nonFatal(e: CorruptionEvent): void {
    e.suppressed = this.signaled;
    this.tell(e);
  }

  private tell(e: CorruptionEvent): void {
    this.signaled = true;
    if (e.suppressed || !this.listener) return;
    e.told = true;
    this.listener(e);
  }
}
