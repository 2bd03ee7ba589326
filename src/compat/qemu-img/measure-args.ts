/**
 * `qemu-img measure`'s own checks of its command line, in QEMU's order: each option as it comes
 * (-l, -o, --output, --size), then the operands against --size, -f, -l and --image-opts. The qcow
 * command checks fewer things (a filename or a size) and words them its way.
 */
import type { Parsed } from '../getopt.js';
import { qemuSizeExact, SizeError } from './options.js';

/** QEMU's -o check: not empty, not starting with a comma, not ending with an odd run of commas. */
export function isValidOptionList(text: string): boolean {
  if (text === '' || text.startsWith(',')) return false;
  const trailing = text.length - text.replace(/,+$/, '').length;
  return trailing % 2 === 0;
}

/** The snapshot options -l takes as `snapshot.KEY=VALUE,...`. */
const SNAPSHOT_KEYS = new Set(['snapshot.id', 'snapshot.name']);

/** QEMU's complaint (each line gets the program's prefix), or undefined when the line is good. */
export function measureArgsComplaint(parsed: Parsed): string[] | undefined {
  let size = false;
  let needsFile = false;
  for (const { key, value = '' } of parsed.options) {
    switch (key) {
      case 'f':
      case 'image-opts':
        needsFile = true;
        break;
      case 'l':
        needsFile = true;
        if (value.startsWith('snapshot.')) {
          for (const item of value.split(',')) {
            const k = item.slice(0, item.includes('=') ? item.indexOf('=') : undefined);
            if (!SNAPSHOT_KEYS.has(k)) return [`Invalid parameter '${k}'`, `Failed in parsing snapshot param '${value}'`];
          }
        }
        break;
      case 'o':
        if (!isValidOptionList(value)) return [`Invalid option list: ${value}`];
        break;
      case 'output':
        if (value !== 'human' && value !== 'json') return ['--output must be used with human or json as argument.'];
        break;
      case 'size':
        try {
          qemuSizeExact(value);
        } catch (e) {
          if (e instanceof SizeError) return e.lines('image size');
          throw e;
        }
        size = true;
        break;
    }
  }
  const files = parsed.operands.length;
  if (files > 1) return ['At most one filename argument is allowed.'];
  if (files === 0 && needsFile) return ['--image-opts, -f, and -l require a filename argument.'];
  if (files === 1 && size) return ['--size N cannot be used together with a filename.'];
  if (files === 0 && !size) return ['Either --size N or one filename must be specified.'];
  return undefined;
}
