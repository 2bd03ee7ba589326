import { chainInfo, imageInfo, infoHuman, defaultOpener, type ImageInfoJson } from '../../node.js';
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
      const info = withFullBackingName(await imageInfo(dev), file);
      if (output === 'json') printJson(info);
      else writeOut(infoHuman(info));
    }
  } finally {
    await dev.close();
  }
}

/** qemu-img prints where the backing file is even when it does not open it; so do we. */
function withFullBackingName(info: ImageInfoJson, file: string): ImageInfoJson {
  const name = info['backing-filename'];
  if (name !== undefined && info['full-backing-filename'] === undefined) {
    const ordered: ImageInfoJson = { ...info };
    ordered['full-backing-filename'] = defaultOpener.resolve(name, file);
    return ordered;
  }
  return info;
}
