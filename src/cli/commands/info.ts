import { chainInfo, imageInfo, infoHuman, defaultOpener, type ImageInfoJson } from '../../node.js';
import { isAbsolute } from 'node:path';
import { checkOutputFormat, openForCli, printJson, writeOut } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  output?: string;
  backingChain?: boolean;
}

export async function run(file: string, flags: Flags): Promise<void> {
  const output = checkOutputFormat(flags.output);
  // info never needs the data: open read-only, and without a password an encrypted image still describes itself.
  const dev = await openForCli(file, flags, { readOnly: true, inspectOnly: true, skipDataFile: true, noBacking: !flags.backingChain });
  try {
    if (flags.backingChain) {
      const infos = await chainInfo(dev);
      if (output === 'json') printJson(infos);
      else writeOut(infos.map(infoHuman).join('\n'));
    } else {
      const info = withFullBackingName(await imageInfo(dev));
      if (output === 'json') printJson(info);
      else writeOut(infoHuman(info));
    }
  } finally {
    await dev.close();
  }
}

/**
 * qemu-img prints where the backing file is even when it does not open it; so do we. A relative
 * name is taken relative to the image's own filename as the device reports it (a `json:` name
 * that comes down to a file is that file), and cannot be placed when that is still a `json:` name
 * (qemu-img then says it cannot determine the actual path).
 */
function withFullBackingName(info: ImageInfoJson): ImageInfoJson {
  const name = info['backing-filename'];
  if (name !== undefined && info['full-backing-filename'] === undefined) {
    const placeable = !info.filename.startsWith('json:') || isAbsolute(name) || /^[a-z][a-z0-9+.-]*:/i.test(name);
    if (!placeable) return info;
    const ordered: ImageInfoJson = { ...info };
    ordered['full-backing-filename'] = name.startsWith('file:') ? name : defaultOpener.resolve(name, info.filename);
    return ordered;
  }
  return info;
}
