/**
 * Sparse-file operations on a file descriptor through the host addon: where the data and the holes
 * are (lseek SEEK_DATA/SEEK_HOLE), punching holes and zeroing ranges (fallocate). FileStore offers
 * them when the addon is loaded; without it stores report every byte as data and write zeros.
 */
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, type HostAddon } from './native.node.js';
import type { DataRun } from '../storage/types.js';

/** Runs of data and holes covering [offset, offset + length) of the file (`size` bytes long). */
export function dataRuns(addon: HostAddon, fd: number, size: number, offset: number, length: number): DataRun[] {
  const end = Math.min(offset + length, size);
  const runs: DataRun[] = [];
  const push = (from: number, to: number, data: boolean) => {
    if (to <= from) return;
    const last = runs[runs.length - 1];
    if (last && last.data === data) last.length += to - from;
    else runs.push({ offset: from, length: to - from, data });
  };
  for (let pos = offset; pos < end; ) {
    const dataAt = addon.seekData(fd, pos);
    // No data at or after pos (ENXIO): the rest of the file is a hole.
    const dataStart = dataAt < 0 ? end : Math.min(dataAt, end);
    push(pos, dataStart, false);
    if (dataStart >= end) break;
    const holeAt = Math.min(addon.seekHole(fd, dataStart), end);
    push(dataStart, holeAt, true);
    pos = holeAt;
  }
  // Past the end of the file (a store asked beyond its size) reads as zeros, like a hole.
  push(Math.max(end, offset), offset + length, false);
  return runs;
}

/** Deallocate the range, keeping the file size (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE). */
export function punchHole(addon: HostAddon, fd: number, offset: number, length: number): void {
  addon.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

/** Zero the range in place (FALLOC_FL_ZERO_RANGE), keeping the file size. */
export function zeroRange(addon: HostAddon, fd: number, offset: number, length: number): void {
  addon.fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}

/** Reserve blocks for the range; the file grows when the range ends past its end. */
export function allocate(addon: HostAddon, fd: number, offset: number, length: number): void {
  addon.fallocate(fd, 0, offset, length);
}
