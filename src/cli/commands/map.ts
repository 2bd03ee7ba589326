import { QcowError, parseSize, mapHumanLines, mapJson, mapHtml, mapPicture, mapSvg } from '../../node.js';
import { checkOutputFormat, openForCli, writeOut } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  output?: string;
  startOffset?: string;
  maxLength?: string;
  cells?: string;
}

export async function run(file: string, flags: Flags): Promise<void> {
  // svg and html draw the whole chain's layout (qcow's own outputs; qemu-img has only these two).
  const picture = flags.output === 'svg' || flags.output === 'html' ? flags.output : undefined;
  const output = picture ? 'human' : checkOutputFormat(flags.output);
  const cells = flags.cells !== undefined ? Number(flags.cells) : undefined;
  if (cells !== undefined && !(Number.isInteger(cells) && cells >= 1 && cells <= 8192)) throw new QcowError('QCOW_INVALID_ARGUMENT', `--cells must be a whole number from 1 to 8192, not '${flags.cells}'`);
  const dev = await openForCli(file, flags, { readOnly: true, inspectOnly: true });
  try {
    if (picture) {
      const pic = await mapPicture(dev, { cells });
      writeOut(picture === 'svg' ? mapSvg(pic) : mapHtml(pic));
      return;
    }
    const start = Math.min(dev.size, flags.startOffset ? parseSize(flags.startOffset, 'offset') : 0);
    const end = flags.maxLength ? Math.min(dev.size, start + parseSize(flags.maxLength, 'length')) : dev.size;
    if (output === 'json') writeOut(await mapJson(dev, start, end));
    else {
      // In pieces as it goes: what precedes an error is printed, as qemu-img prints it.
      let pending = '';
      try {
        for await (const line of mapHumanLines(dev, start, end)) {
          pending += line;
          if (pending.length >= 65536) {
            writeOut(pending);
            pending = '';
          }
        }
      } finally {
        writeOut(pending);
      }
    }
  } finally {
    await dev.close();
  }
}
