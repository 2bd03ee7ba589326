/**
 * The qemu-io command language, the subset used to script and test images:
 *   read  [-P PATTERN] [-q] OFF LEN      (verifies the pattern when given)
 *   write [-P PATTERN] [-z [-u]] [-c] [-q] OFF LEN
 *   discard [-q] OFF LEN, flush, map, length
 * Offsets and lengths take k/M/G suffixes and any alignment.
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';
import { formatSize, parseOffset } from '../core/size.js';

export interface IoResult {
  ok: boolean;
  output: string;
}

const usage = (msg: string) => new QcowError('QCOW_INVALID_ARGUMENT', msg);

function parsePattern(text: string | undefined): number {
  if (text === undefined) throw usage('-P needs a pattern');
  const v = /^0x[0-9a-f]+$/i.test(text) ? Number.parseInt(text, 16) : Number(text);
  if (!Number.isInteger(v) || v < 0 || v > 255) throw usage(`invalid pattern '${text}': expected a byte value (0..255)`);
  return v;
}

interface Parsed {
  flags: Set<string>;
  pattern?: number;
  args: string[];
}

function parseArgs(words: string[], allowed: string): Parsed {
  const p: Parsed = { flags: new Set(), args: [] };
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    if (w.startsWith('-') && w.length > 1 && !/^-\d/.test(w)) {
      for (const ch of w.slice(1)) {
        if (!allowed.includes(ch)) throw usage(`invalid option -${ch}`);
        if (ch === 'P') p.pattern = parsePattern(words[++i]);
        else p.flags.add(ch);
      }
    } else p.args.push(w);
  }
  return p;
}

function range(dev: BlockDevice, p: Parsed, name: string): [number, number] {
  if (p.args.length !== 2) throw usage(`${name} takes OFFSET and LENGTH`);
  const off = parseOffset(p.args[0]!, 'offset');
  const len = parseOffset(p.args[1]!, 'length');
  if (off + len > dev.size) throw new QcowError('QCOW_OUT_OF_RANGE', `${name} [${off}, +${len}) is beyond the end of the image (${dev.size} bytes)`);
  return [off, len];
}

const CHUNK = 16 * 1024 * 1024;

export async function runIoCommand(dev: BlockDevice, line: string): Promise<IoResult> {
  const words = line.trim().split(/\s+/).filter(Boolean);
  const [cmd, ...rest] = words;
  const t0 = performance.now();
  const timing = (len: number) => {
    const secs = (performance.now() - t0) / 1000;
    return `${formatSize(len)}, 1 ops; ${secs.toFixed(4).padStart(7, '0')} sec (${formatSize(len / Math.max(secs, 1e-9))}/sec and ${(1 / Math.max(secs, 1e-9)).toFixed(4)} ops/sec)\n`;
  };
  switch (cmd) {
    case 'read': {
      const p = parseArgs(rest, 'Pqv');
      const [off, len] = range(dev, p, 'read');
      for (let done = 0; done < len; ) {
        const n = Math.min(CHUNK, len - done);
        const buf = new Uint8Array(n);
        await dev.read(off + done, buf);
        if (p.pattern !== undefined) {
          const bad = buf.findIndex((b) => b !== p.pattern);
          if (bad >= 0) {
            return { ok: false, output: `Pattern verification failed at offset ${off + done + bad}, ${len} bytes\n` };
          }
        }
        done += n;
      }
      return { ok: true, output: p.flags.has('q') ? '' : `read ${len}/${len} bytes at offset ${off}\n` + timing(len) };
    }
    case 'write': {
      const p = parseArgs(rest, 'Pzucq');
      const [off, len] = range(dev, p, 'write');
      if (p.flags.has('u') && !p.flags.has('z')) throw usage('-u requires -z');
      if (p.flags.has('z') && p.pattern !== undefined) throw usage('-z and -P cannot be specified at the same time');
      if (p.flags.has('z')) {
        await dev.writeZeroes(off, len, { mayUnmap: p.flags.has('u') });
      } else if (p.flags.has('c')) {
        if (!dev.writeCompressed) throw new QcowError('QCOW_UNSUPPORTED', `${dev.format} does not support compressed writes`);
        const buf = new Uint8Array(len).fill(p.pattern ?? 0xcd);
        const cs = dev.clusterSize;
        if (off % cs !== 0 || (len % cs !== 0 && off + len !== dev.size)) {
          throw usage(`compressed writes must cover whole clusters (${cs} bytes)`);
        }
        for (let o = 0; o < len; o += cs) await dev.writeCompressed(off + o, buf.subarray(o, Math.min(o + cs, len)));
      } else {
        for (let done = 0; done < len; ) {
          const n = Math.min(CHUNK, len - done);
          await dev.write(off + done, new Uint8Array(n).fill(p.pattern ?? 0xcd));
          done += n;
        }
      }
      return { ok: true, output: p.flags.has('q') ? '' : `wrote ${len}/${len} bytes at offset ${off}\n` + timing(len) };
    }
    case 'discard': {
      const p = parseArgs(rest, 'q');
      const [off, len] = range(dev, p, 'discard');
      await dev.discard(off, len);
      return { ok: true, output: p.flags.has('q') ? '' : `discard ${len}/${len} bytes at offset ${off}\n` + timing(len) };
    }
    case 'flush':
      await dev.flush();
      return { ok: true, output: '' };
    case 'length':
      return { ok: true, output: `${formatSize(dev.size)}\n` };
    case 'map': {
      let out = '';
      for (const e of await dev.blockStatus(0, dev.size)) {
        out += `${formatSize(e.length)} (0x${e.length.toString(16)}) bytes ${e.allocated ? '    allocated' : 'not allocated'} at offset ${formatSize(e.offset)} (0x${e.offset.toString(16)})\n`;
      }
      return { ok: true, output: out };
    }
    case undefined:
      return { ok: true, output: '' };
    default:
      throw usage(`command '${cmd}' not found (known: read, write, discard, flush, map, length)`);
  }
}
