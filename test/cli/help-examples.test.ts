/**
 * `qcow help COMMAND` teaches: every command prints its examples after its options, and every
 * example names options the command really has (so the help cannot drift from the parser).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildProgram } from '#src/cli/program.js';
import { HELP_EXAMPLES } from '#src/cli/help-examples.js';
import { qcow } from '../support/qemu.js';

test('every command has examples, and they use only options the command has', () => {
  const program = buildProgram(['node', 'qcow']);
  for (const cmd of program.commands) {
    const examples = HELP_EXAMPLES[cmd.name()];
    assert.ok(examples && examples.length >= 2, `${cmd.name()} has examples`);
    const known = new Set(cmd.options.flatMap((o) => [o.short, o.long].filter((f): f is string => f !== undefined)));
    for (const [line] of examples) {
      assert.ok(line.startsWith(`qcow ${cmd.name()} `), line);
      // Quoted words are arguments (qemu-io commands), not options.
      for (const flag of line.replace(/'[^']*'|"[^"]*"/g, '').match(/(?<=\s)--?[a-zA-Z][\w-]*/g) ?? []) assert.ok(known.has(flag), `${line}: ${flag} is not an option of ${cmd.name()}`);
    }
  }
});

test('qcow help COMMAND and COMMAND --help print the examples', async () => {
  for (const args of [['help', 'convert'], ['convert', '--help']]) {
    const r = await qcow(args);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Usage: qcow convert [^]*Examples:\n {2}qcow convert -O raw disk\.qcow2 disk\.raw\n/);
  }
});
