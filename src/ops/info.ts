/** `qemu-img info`: what an image is, with qemu-img's JSON keys and its human layout. */
import type { BlockDevice, SnapshotInfo } from '../core/block-device.js';
import { chainOf } from '../chain/open.js';
import { formatSize } from '../core/size.js';
import { byteCountText } from '../core/bytes.js';

/** One image as `qemu-img info --output=json` describes it, with qemu-img's keys. */
export interface ImageInfoJson {
  /** The image's name as opened. */
  filename: string;
  /** The format's name. */
  format: string;
  /** Virtual (guest-visible) size in bytes. */
  'virtual-size': number;
  /** Bytes the file occupies on disk (allocated blocks), when the store can tell. */
  'actual-size'?: number;
  /** Cluster size in bytes, for formats that have clusters. */
  'cluster-size'?: number;
  /** Present (true) when the image is encrypted. */
  encrypted?: boolean;
  /** The backing file name as recorded in the header. */
  'backing-filename'?: string;
  /** The backing file's resolved name, when it was opened. */
  'full-backing-filename'?: string;
  /** The backing file's format as recorded in the header. */
  'backing-filename-format'?: string;
  /** Internal snapshots, with qemu-img's keys ("id", "name", "vm-state-size", "date-sec"...). */
  snapshots?: Record<string, unknown>[];
  /** qemu-img's "format-specific" object. */
  'format-specific'?: {
    /** The format's name ("qcow2"). */
    type: string;
    /** The format's fields, with qemu-img's keys. */
    data: Record<string, unknown>;
  };
  /** qcow2's dirty bit (false for other formats). */
  'dirty-flag'?: boolean;
}

/**
 * `qemu-img info --output=json` of one image (only the top of `dev`'s chain).
 *
 * @example
 * ```ts
 * import { openImage, imageInfo, infoHuman } from 'qcow/node';
 *
 * await using dev = await openImage('disk.qcow2', { readOnly: true });
 * const info = await imageInfo(dev);
 * console.log(info['virtual-size'], info['backing-filename']);
 * process.stdout.write(infoHuman(info));
 * ```
 */
export async function imageInfo(dev: BlockDevice): Promise<ImageInfoJson> {
  const d = await dev.describe();
  const info: ImageInfoJson = { filename: dev.filename, format: d.format, 'virtual-size': d.virtualSize, 'dirty-flag': d.dirty ?? false };
  const actual = dev.store.allocatedSize ? await dev.store.allocatedSize() : undefined;
  if (actual !== undefined) info['actual-size'] = actual;
  // Without driver information, qemu-img knows no dirty flag (it comes last in its output).
  if (d.driverInfo === false) delete info['dirty-flag'];
  if (d.clusterSize !== undefined) info['cluster-size'] = d.clusterSize;
  if (d.encrypted) info.encrypted = true;
  if (d.backingFilename !== undefined) {
    info['backing-filename'] = d.backingFilename;
    // A name with the file protocol's prefix ("file:PATH") is its own full name in QEMU.
    if (dev.backing) info['full-backing-filename'] = d.backingFilename.startsWith('file:') && dev.backing.filename === d.backingFilename.slice(5) ? d.backingFilename : dev.backing.filename;
    if (d.backingFormat !== undefined) info['backing-filename-format'] = d.backingFormat;
  }
  if (d.snapshots?.length) info.snapshots = d.snapshots.map(snapshotJson);
  if (d.formatSpecific) info['format-specific'] = d.formatSpecific;
  return info;
}

/** {@link imageInfo} of every image of `dev`'s chain, top first (`qemu-img info --backing-chain`). */
export async function chainInfo(dev: BlockDevice): Promise<ImageInfoJson[]> {
  const out: ImageInfoJson[] = [];
  for (const layer of chainOf(dev)) out.push(await imageInfo(layer));
  return out;
}

function snapshotJson(s: SnapshotInfo): Record<string, unknown> {
  const o: Record<string, unknown> = {
    id: s.id,
    name: s.name,
    'vm-state-size': s.vmStateSize,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
    'vm-clock-nsec': s.vmClockNsec % 1e9,
  };
  if (s.icount !== undefined) o.icount = s.icount;
  return o;
}

/** qemu-img's human layout. */
export function infoHuman(info: ImageInfoJson): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${formatSize(info['virtual-size'])} (${byteCountText(info['virtual-size'])} bytes)`,
  ];
  // A store that cannot tell (an NBD export, a URL): qemu-img says so.
  lines.push(`disk size: ${info['actual-size'] !== undefined ? formatSize(info['actual-size']) : 'unavailable'}`);
  if (info.encrypted) lines.push('encrypted: yes');
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['backing-filename'] !== undefined) {
    const full = info['full-backing-filename'];
    // Unknown where a relative name points (the image has no plain filename): qemu-img says so.
    const where = full === undefined ? ' (cannot determine actual path)' : full !== info['backing-filename'] ? ` (actual path: ${full})` : '';
    lines.push(`backing file: ${info['backing-filename']}${where}`);
    if (info['backing-filename-format']) lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  if (info.snapshots?.length) {
    lines.push('Snapshot list:');
    lines.push(snapshotTable(info.snapshots));
  }
  if (info['format-specific']) {
    lines.push('Format specific information:');
    lines.push(...nested(info['format-specific'].data, 1));
  }
  return lines.join('\n') + '\n';
}

/** The snapshot list as `qemu-img snapshot -l` prints it, from the `snapshots` of {@link ImageInfoJson}. */
export function snapshotTable(snaps: Record<string, unknown>[]): string {
  const rows = ['ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT'];
  for (const s of snaps) {
    const date = new Date(Number(s['date-sec']) * 1000);
    const p2 = (n: number) => String(n).padStart(2, '0');
    const dateStr = `${date.getFullYear()}-${p2(date.getMonth() + 1)}-${p2(date.getDate())} ${p2(date.getHours())}:${p2(date.getMinutes())}:${p2(date.getSeconds())}`;
    const clockNs = Number(s['vm-clock-sec']) * 1e9 + Number(s['vm-clock-nsec']);
    const secs = Math.floor(clockNs / 1e9);
    const clock = `${p2(Math.floor(secs / 3600))}:${p2(Math.floor(secs / 60) % 60)}:${p2(secs % 60)}.${String(Math.floor((clockNs % 1e9) / 1e6)).padStart(3, '0')}`;
    const icount = s.icount === undefined ? '' : String(s.icount);
    // The widths of the header, but a space always follows the ID and the name: a name longer than
    // its column stays apart from the VM state size, as with qemu-img.
    rows.push(
      `${String(s.id).padEnd(9)} ${String(s.name).padEnd(16)} ${formatSize(Number(s['vm-state-size'])).padStart(8)}${dateStr.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`,
    );
  }
  return rows.join('\n');
}

function nested(data: Record<string, unknown>, level: number): string[] {
  const out: string[] = [];
  const ind = '    '.repeat(level);
  for (const [k, v] of Object.entries(data)) {
    const key = k.replace(/-/g, ' ');
    if (v !== null && typeof v === 'object' && !Array.isArray(v)) {
      out.push(`${ind}${key}:`);
      out.push(...nested(v as Record<string, unknown>, level + 1));
    } else if (Array.isArray(v)) {
      out.push(`${ind}${key}:`);
      for (const item of v) {
        if (item !== null && typeof item === 'object') {
          const sub = nested(item as Record<string, unknown>, level + 2);
          sub[0] = `${'    '.repeat(level + 1)}[${v.indexOf(item)}]:\n${sub[0]}`;
          out.push(...sub);
        } else out.push(`${ind}    [${v.indexOf(item)}]: ${String(item)}`);
      }
    } else out.push(`${ind}${key}: ${String(v)}`);
  }
  return out;
}
