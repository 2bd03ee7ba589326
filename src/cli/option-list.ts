/**
 * QEMU's option-list syntax, shared by `qcow -o`, compat/qemu-img's `-o` and qemu-io's `-o`:
 * comma-separated items, where ",," stands for a literal comma. What an item means (`k=v`, a bare
 * word) is up to each caller.
 */

/** The items of `text`, split on single commas, with ",," turned into ",". Empty items are kept. */
export function splitOptionItems(text: string): string[] {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ',' && text[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (text[i] === ',') {
      parts.push(cur);
      cur = '';
    } else cur += text[i];
  }
  parts.push(cur);
  return parts;
}
