import { chainInfo, imageInfo, infoHuman } from '../../ops/info.js';
import { checkOutputFormat, openForCli, printJson } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  output?: string;
  backingChain?: boolean;
}

export async function run(file: string, flags: Flags): Promise<void> {
  const output = checkOutputFormat(flags.output);
  // info never needs the data: open read-only, and without a password an encrypted image still describes itself.
  const dev = await openForCli(file, flags, { readOnly: true, inspectOnly: true, noBacking: !flags.backingChain });
  try {
    if (flags.backingChain) {
      const infos = await chainInfo(dev);
      if (output === 'json') printJson(infos);
      else process.stdout.write(infos.map(infoHuman).join('\n'));
    } else {
      const info = await imageInfo(dev);
      if (output === 'json') printJson(info);
      else process.stdout.write(infoHuman(info));
    }
  } finally {
    await dev.close();
  }
}
