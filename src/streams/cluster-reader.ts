/**
 * The byte side of reading an image from a stream: whole pieces (clusters) of the file, in order,
 * from either kind of input.
 *
 * - A {@link StreamSource} reads into memory we give it (a pipe's file descriptor: `fdSource` in
 *   `qcow/node`). Its bytes land in a few reused slabs, and each piece handed out is a view of
 *   one: no allocation per piece, and no memory touched for the first time past the first slabs
 *   (on our VMs every first-touched page costs ~12-16 us; a new 64 KiB buffer per pipe read was
 *   ~20k page faults per GiB).
 * - An async iterable of chunks (a Node Readable, a web stream, an HTTP body) gives its chunks in
 *   buffers of its own. A piece inside one chunk is a view of it; a piece across chunks is
 *   gathered into a slab, not into a new array.
 *
 * Either way a piece stays valid while the next {@link ClusterReader.retain} pieces are taken (the
 * qcow2 reader looks back two clusters for compressed data running across them), and beyond that
 * only while it is pinned ({@link ClusterReader.pin}: a write still in flight). A reader that keeps
 * a piece longer (a cluster held for a table still to come) copies it.
 */

/** Input that reads into the caller's memory, as `read(2)` does: what a file descriptor gives. */
export interface StreamSource {
  /**
   * Fill the start of `into` with the stream's next bytes; resolves to how many (0: it has ended).
   * A source that can wait long for its writer rejects with `signal`'s reason once it is aborted.
   */
  read(into: Uint8Array, signal?: AbortSignal): Promise<number>;
}

/** Whether `input` is a {@link StreamSource} rather than an async iterable of chunks. */
export function isStreamSource(input: AsyncIterable<Uint8Array> | StreamSource): input is StreamSource {
  return typeof (input as StreamSource).read === 'function' && !(Symbol.asyncIterator in input);
}

/** Slabs are at least this large (and a power of two): a pipe read gives 64 KiB at most. */
const SLAB_BYTES = 1024 * 1024;

class Slab {
  /** Pieces still using it: the retained ones, and the pinned. */
  refs = 0;
  constructor(readonly buf: Uint8Array) {}
}

/** Turns a stream into consecutive pieces of the sizes asked for. */
export class ClusterReader {
  /** Bytes of the stream handed out so far. */
  offset = 0;
  /** Pieces stay valid while this many more are taken. */
  readonly retain: number;
  private readonly source: StreamSource | undefined;
  private readonly it: AsyncIterator<Uint8Array> | undefined;
  private done = false;
  /** Iterator input: chunks not handed out yet. */
  private pending: Uint8Array[] = [];
  private pendingBytes = 0;
  /** The slab being filled; source input: its bytes [start, end) are not handed out yet. */
  private slab: Slab | undefined;
  private start = 0;
  private end = 0;
  /** Slabs given up for a new one, reused once nothing uses them. */
  private spare: Slab[] = [];
  /** The slab of each of the last pieces handed out (undefined: a view of a chunk). */
  private recent: (Slab | undefined)[] = [];
  private readonly slabOf = new Map<ArrayBufferLike, Slab>();
  private readonly signal: AbortSignal | undefined;

  /** `signal` is passed to a source's reads, which may wait on a silent writer (see StreamSource). */
  constructor(input: AsyncIterable<Uint8Array> | StreamSource, options: { retain?: number; signal?: AbortSignal } = {}) {
    this.retain = options.retain ?? 2;
    this.signal = options.signal;
    if (isStreamSource(input)) this.source = input;
    else this.it = input[Symbol.asyncIterator]();
  }

  /** Bytes arrived and not handed out yet. */
  private get available(): number {
    return this.source ? this.end - this.start : this.pendingBytes;
  }

  /**
   * The next `n` bytes (fewer only at the end of the stream), valid while the next `retain`
   * pieces are taken, or while pinned.
   */
  async take(n: number): Promise<Uint8Array> {
    this.release();
    // Only when the bytes are not here yet: a cluster already read costs no promise to wait on.
    if (this.available < n && !this.done) await this.fill(n);
    const k = Math.min(n, this.available);
    let view: Uint8Array;
    let slab: Slab | undefined;
    if (this.source) {
      slab = this.slab;
      view = k === 0 ? new Uint8Array(0) : slab!.buf.subarray(this.start, this.start + k);
      this.start += k;
    } else {
      const head = this.pending[0];
      if (head && head.length >= k) {
        // The common case, one chunk holding it all: a view of it (the chunk is not reused).
        view = head.subarray(0, k);
        if (head.length === k) this.pending.shift();
        else this.pending[0] = head.subarray(k);
      } else {
        this.room(k);
        slab = this.slab!;
        view = slab.buf.subarray(this.start, this.start + k);
        for (let filled = 0; filled < k; ) {
          const c = this.pending[0]!;
          const m = Math.min(c.length, k - filled);
          view.set(c.subarray(0, m), filled);
          filled += m;
          if (m === c.length) this.pending.shift();
          else this.pending[0] = c.subarray(m);
        }
        this.start = this.end = this.start + k;
      }
      this.pendingBytes -= k;
    }
    if (slab) slab.refs++;
    this.recent.push(slab);
    this.offset += k;
    return view;
  }

  /** A copy of the next `n` bytes (fewer at the end), left in the stream. */
  async peek(n: number): Promise<Uint8Array> {
    await this.fill(n);
    const k = Math.min(n, this.available);
    if (this.source) return this.slab ? this.slab.buf.slice(this.start, this.start + k) : new Uint8Array(0);
    const out = new Uint8Array(k);
    for (let i = 0, at = 0; at < k; i++) {
      const c = this.pending[i]!;
      const m = Math.min(c.length, k - at);
      out.set(c.subarray(0, m), at);
      at += m;
    }
    return out;
  }

  /**
   * Pieces as they come, up to `max` bytes each, until the stream ends (raw images, which have no
   * clusters). Each is valid until the loop asks for the next.
   */
  async *pieces(max = SLAB_BYTES): AsyncGenerator<Uint8Array> {
    for (;;) {
      let want = max;
      if (!this.source) {
        // Chunks are passed on as they are; source input gathers `max` bytes (one write per MiB,
        // not one per pipe read).
        await this.fill(1);
        want = Math.min(max, this.pending[0]?.length ?? 0);
        if (want === 0) return;
      }
      const piece = await this.take(want);
      if (piece.length === 0) return;
      yield piece;
    }
  }

  /**
   * Keep a piece's memory from reuse until {@link unpin} (a write of it still in flight). False
   * when `view` is not the reader's memory (a chunk of the input, a buffer of the caller's): it
   * is never reused, so there is nothing to keep.
   */
  pin(view: Uint8Array): boolean {
    const slab = this.slabOf.get(view.buffer);
    if (slab) slab.refs++;
    return slab !== undefined;
  }

  unpin(view: Uint8Array): void {
    const slab = this.slabOf.get(view.buffer);
    if (slab) slab.refs--;
  }

  /** Pieces older than the last `retain` no longer hold their slabs. */
  private release(): void {
    while (this.recent.length > this.retain) {
      const s = this.recent.shift();
      if (s) s.refs--;
    }
  }

  /** Until `n` bytes are available or the stream has ended. */
  private async fill(n: number): Promise<void> {
    if (this.source) {
      if (this.end - this.start >= n || this.done) return;
      this.room(n);
      const buf = this.slab!.buf;
      while (this.end - this.start < n && !this.done) {
        // As much as the slab has room for: a regular file gives it all in one read.
        const got = await this.source.read(buf.subarray(this.end), this.signal);
        if (got === 0) this.done = true;
        else this.end += got;
      }
      return;
    }
    while (this.pendingBytes < n && !this.done) {
      const r = await this.it!.next();
      if (r.done) this.done = true;
      else if (r.value.length > 0) {
        this.pending.push(r.value);
        this.pendingBytes += r.value.length;
      }
    }
  }

  /**
   * Make the current slab hold `n` bytes from `start` contiguously: if it cannot, the bytes not
   * handed out yet move to another slab, placed at the stream offset's position modulo the slab's
   * size, so that pieces of a power-of-two size taken at multiples of it (clusters) never straddle
   * a slab's end.
   */
  private room(n: number): void {
    const cur = this.slab;
    if (cur && this.start + n <= cur.buf.length) return;
    const size = Math.max(SLAB_BYTES, 2 ** Math.ceil(Math.log2(Math.max(1, n))));
    let next: Slab | undefined;
    for (let i = 0; i < this.spare.length; i++) {
      const s = this.spare[i]!;
      if (s.refs === 0 && s.buf.length >= size) {
        next = s;
        this.spare.splice(i, 1);
        break;
      }
    }
    if (!next) {
      next = new Slab(new Uint8Array(size));
      this.slabOf.set(next.buf.buffer, next);
    }
    const length = next.buf.length;
    const left = this.end - this.start;
    let at = this.offset % length;
    if (at + Math.max(n, left) > length) at = 0;
    if (cur && left > 0) next.buf.set(cur.buf.subarray(this.start, this.end), at);
    this.slab = next;
    this.start = at;
    this.end = at + left;
    if (cur) this.retire(cur, size);
  }

  /** A slab given up: kept for reuse unless too small now, or more than a few are spare already. */
  private retire(slab: Slab, size: number): void {
    this.spare.push(slab);
    // Slabs in use stay (pin and unpin find them here); free ones only while large enough and few.
    let free = 0;
    this.spare = this.spare.filter((s) => s.refs > 0 || (s.buf.length >= size && ++free <= 8));
    for (const [buffer, s] of this.slabOf) if (s !== this.slab && !this.spare.includes(s)) this.slabOf.delete(buffer);
  }
}
