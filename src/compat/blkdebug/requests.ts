/**
 * The shape QEMU's block layer gives requests to a node with a request alignment and a largest
 * transfer (blkdebug's `align` and `max-transfer`): widened to whole aligned blocks (a write
 * reads the partial blocks at its ends first, modifies and writes them back) and cut into pieces
 * no longer than the largest transfer. The node sees only such requests.
 */

/** How a node moves aligned pieces. */
export interface AlignedIo {
  align: number;
  /** 0: no limit. */
  maxTransfer: number;
  readPiece(offset: number, into: Uint8Array): Promise<void>;
  /** `options`: the request's own (a device's write options), handed to each piece. */
  writePiece(offset: number, data: Uint8Array, options?: unknown): Promise<void>;
}

/** [offset, length] pieces of [offset, offset + length) no longer than `max` (0: one piece). */
export function pieces(offset: number, length: number, max: number): Array<[number, number]> {
  if (max === 0 || length <= max) return [[offset, length]];
  const out: Array<[number, number]> = [];
  for (let at = offset; at < offset + length; at += max) out.push([at, Math.min(max, offset + length - at)]);
  return out;
}

async function readWhole(io: AlignedIo, offset: number, into: Uint8Array): Promise<void> {
  for (const [at, len] of pieces(offset, into.length, io.maxTransfer)) await io.readPiece(at, into.subarray(at - offset, at - offset + len));
}

async function writeWhole(io: AlignedIo, offset: number, data: Uint8Array, options: unknown): Promise<void> {
  for (const [at, len] of pieces(offset, data.length, io.maxTransfer)) await io.writePiece(at, data.subarray(at - offset, at - offset + len), options);
}

export async function alignedRead(io: AlignedIo, offset: number, into: Uint8Array): Promise<void> {
  const { align } = io;
  const start = offset - (offset % align);
  const end = Math.ceil((offset + into.length) / align) * align;
  if (start === offset && end === offset + into.length) return readWhole(io, offset, into);
  const buf = new Uint8Array(end - start);
  await readWhole(io, start, buf);
  into.set(buf.subarray(offset - start, offset - start + into.length));
}

export async function alignedWrite(io: AlignedIo, offset: number, data: Uint8Array, options?: unknown): Promise<void> {
  const { align } = io;
  const start = offset - (offset % align);
  const end = Math.ceil((offset + data.length) / align) * align;
  if (start === offset && end === offset + data.length) return writeWhole(io, offset, data, options);
  const buf = new Uint8Array(end - start);
  const head = start !== offset;
  if (head) await readWhole(io, start, buf.subarray(0, align));
  if (end !== offset + data.length && !(head && end - align === start)) await readWhole(io, end - align, buf.subarray(buf.length - align));
  buf.set(data, offset - start);
  await writeWhole(io, start, buf, options);
}
