/**
 * What a guest write puts into clusters. Usually the caller's bytes; with copy offload
 * (BlockDevice.writePlaced) a callback that has another store copy its bytes straight into the
 * host ranges the write path chose, so they never pass through JavaScript. The write path
 * allocates, orders and links clusters the same way for both.
 */
import type { PlacedRange } from '../../core/block-device.js';
import { QcowError } from '../../core/errors.js';
import type { ByteStore } from '../../storage/types.js';

export interface Payload {
  readonly length: number;
  /** [from, to) of this payload (offsets relative to its start). */
  slice(from: number, to: number): Payload;
  /** The bytes of [from, to), to merge with copy-on-write data around them. */
  bytes(from: number, to: number): Uint8Array;
  /**
   * Put [from, to) at `host` in `store` unchanged; `guest` is where [from, to) belongs in the
   * guest. Null when the caller should write `bytes()` itself (it may need to encrypt them).
   */
  placer(): ((store: ByteStore, from: number, to: number, host: number, guest: number) => Promise<void>) | null;
}

/** The caller's bytes. */
export class BytesPayload implements Payload {
  constructor(private readonly data: Uint8Array) {}
  get length(): number {
    return this.data.length;
  }
  slice(from: number, to: number): Payload {
    return new BytesPayload(this.data.subarray(from, to));
  }
  bytes(from: number, to: number): Uint8Array {
    return this.data.subarray(from, to);
  }
  placer(): null {
    return null;
  }
}

/**
 * Bytes another store copies into place: `put` receives each host range. They are never in
 * memory, so a write that would need them merged with copy-on-write data (a request that does
 * not cover whole clusters) is refused; writePlaced takes whole clusters only.
 */
export class PlacedPayload implements Payload {
  constructor(
    private readonly guest: number,
    readonly length: number,
    private readonly put: (range: PlacedRange) => Promise<void>,
  ) {}
  slice(from: number, to: number): Payload {
    return new PlacedPayload(this.guest + from, to - from, this.put);
  }
  bytes(): Uint8Array {
    throw new QcowError('QCOW_UNSUPPORTED', 'copy offload writes whole clusters only');
  }
  placer() {
    return (store: ByteStore, from: number, to: number, host: number, guest: number) => this.put({ offset: guest, length: to - from, store, hostOffset: host });
  }
}
