/** QEMU's words about an image opened writable whose format was probed as raw. */
/**
 * What QEMU prints on standard error when it opens an image writable whose format it had to probe
 * and took for raw (its raw driver then restricts writes to block 0): three lines, the later two
 * indented under the first's text.
 */
export function probedRawWarning(name: string): string {
  const indent = ' '.repeat('WARNING: '.length);
  return (
    `WARNING: Image format was not specified for '${name}' and probing guessed raw.\n` +
    `${indent}Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n` +
    `${indent}Specify the 'raw' format explicitly to remove the restrictions.\n`
  );
}
