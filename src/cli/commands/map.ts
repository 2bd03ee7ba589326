import { parseSize } from '../../core/size.js';
import { mapHuman, mapJson } from '../../ops/map.js';
import { checkOutputFormat, openForCli, writeOut } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  output?: string;
  startOffset?: string;
  maxLength?: string;
}

export async function run(file: string, flags: Flags): Promise<void> {
  const output = checkOutputFormat(flags.output);
  const dev = await openForCli(file, flags, { readOnly: true, inspectOnly: true });
  try {
    const start = Math.min(dev.size, flags.startOffset ? parseSize(flags.startOffset, 'offset') : 0);
    const end = flags.maxLength ? Math.min(dev.size, start + parseSize(flags.maxLength, 'length')) : dev.size;
    writeOut(output === 'json' ? await mapJson(dev, start, end) : await mapHuman(dev, start, end));
  } finally {
    await dev.close();
  }
}
