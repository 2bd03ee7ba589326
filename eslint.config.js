// Lint rules. The browser-safe core (core/, storage/ except node-only files, formats/, chain, ops/)
// must not import node: modules; Node-only code lives in files named *.node.ts, cli/, nbd/.
// src/ is what ships: it imports nothing from the tooling beside it (test/: tests, their helpers,
// the hostile-image corpus, fuzzers; bench/: the benchmark harnesses), which npm pack leaves out.
// Operations and edges (ops/, cli/, nbd/, compat/, web/, browser/) import no format's modules.
// The command line (cli/, compat/) imports the library only through its public entry points.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

/**
 * The tooling, however reached: a relative path out of src/, or the '#src/*' import that the
 * tooling uses for the library (inside src/ a relative import says the same without leaving it).
 */
const NO_TOOLING = {
  // A regex: in the gitignore syntax of `group`, '#' would start a comment.
  regex: '(^|/)(test|bench|dist-test|dist-bench)/|^#src/',
  message: 'src/ ships: it must not import tests, test helpers, benchmark harnesses or fuzzers (test/, bench/), nor itself through #src/.',
};

/** A format's own modules: above the formats, code reaches them only through the registry and capabilities. */
const FORMAT_INTERNALS = {
  group: ['**/formats/*/*'],
  message: "Operations and edges reach a format through ImageFormat and BlockDevice (check, measure, amend, snapshots, bitmaps...) and builtinFormats(), not through the format's modules.",
};
/**
 * The command line (src/cli, src/compat) uses the library as a package user would: through
 * src/index.ts and src/node.ts (`qcow`, `qcow/node`), besides each other, node: built-ins and
 * dependencies. One rule per folder depth, as relative paths say where they lead only from a
 * known depth: `depth` 1 is src/cli/*.ts, 2 is src/cli/commands/*.ts. Package imports (`#...`)
 * reach internals too.
 */
function entryPointsOnly(depth) {
  const up = `(?:\\.\\./){${depth}}`;
  return {
    regex: `^(?:${up}(?!(?:index|node)\\.js$|cli/|compat/)|${up}\\.\\./|#)`,
    message: "The CLI and the QEMU front ends use the library through its entry points only: import from src/node.ts (or src/index.ts), exporting what is missing there.",
  };
}
const NODE = { group: ['node:*'], message: 'The core must run in a browser: put Node-only code in a *.node.ts file.' };

export default tseslint.config(
  { ignores: ['dist/**', 'dist-test/**', 'dist-bench/**', 'node_modules/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/no-explicit-any': 'error',
      'no-constant-condition': ['error', { checkLoops: false }],
    },
  },
  // What ships must not import the tooling around it (tests, their helpers, harnesses, fuzzers):
  // npm pack leaves those out, so such an import would break the published package.
  {
    files: ['src/**/*.ts'],
    rules: { 'no-restricted-imports': ['error', { patterns: [NO_TOOLING] }] },
  },
  {
    files: ['src/core/**/*.ts', 'src/storage/**/*.ts', 'src/formats/**/*.ts', 'src/crypto/**/*.ts', 'src/compress/**/*.ts', 'src/chain/**/*.ts', 'src/ops/**/*.ts', 'src/browser/**/*.ts', 'src/overlay/**/*.ts'],
    ignores: ['**/*.node.ts'],
    rules: {
      'no-restricted-imports': ['error', { patterns: [NODE, NO_TOOLING] }],
    },
  },
  // Operations and the edges (CLI, NBD, front ends, pages) above the formats: capabilities only.
  {
    files: ['src/cli/**/*.ts', 'src/nbd/**/*.ts', 'src/compat/**/*.ts', 'src/web/**/*.ts'],
    rules: { 'no-restricted-imports': ['error', { patterns: [NO_TOOLING, FORMAT_INTERNALS] }] },
  },
  ...[1, 2, 3].map((depth) => ({
    files: ['src/cli/', 'src/compat/'].map((dir) => `${dir}${'*/'.repeat(depth - 1)}*.ts`),
    rules: {
      'no-restricted-imports': ['error', { patterns: [NO_TOOLING, FORMAT_INTERNALS, entryPointsOnly(depth)] }],
      // no-restricted-imports does not look at import(), which the CLI uses to load commands and
      // their heavier parts late. (esquery's regular expressions cannot hold a '/': \x2F is one.)
      'no-restricted-syntax': [
        'error',
        { selector: `ImportExpression > Literal.source[value=/${entryPointsOnly(depth).regex.replaceAll('/', '\\x2F')}/]`, message: entryPointsOnly(depth).message },
        {
          selector: 'ImportExpression > Literal.source[value=/^(\\.\\.\\x2F)+(index|node)\\.js$/]',
          message: 'A dynamic import of an entry point puts every export of the package into the bundle of each command: import the few names from a module of the CLI that re-exports them (cli/open-images.ts), and import that late.',
        },
      ],
    },
  })),
  {
    files: ['src/ops/**/*.ts', 'src/browser/**/*.ts'],
    ignores: ['**/*.node.ts'],
    rules: { 'no-restricted-imports': ['error', { patterns: [NODE, NO_TOOLING, FORMAT_INTERNALS] }] },
  },
);
