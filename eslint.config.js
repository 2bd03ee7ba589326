// Lint rules. The browser-safe core (core/, storage/ except node-only files, formats/, chain, ops/)
// must not import node: modules; Node-only code lives in files named *.node.ts, cli/, nbd/, bench/
// and test files. Nothing that ships imports the tooling (tests, helpers, harnesses, fuzzers).
// Operations and edges (ops/, cli/, nbd/, compat/, web/, browser/) import no format's modules.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

/** Tests, their helpers, benchmark harnesses and fuzzers: kept apart from what ships. */
const TOOLING = ['**/*.test.ts', '**/*.test-helpers.ts', '**/*.test.helpers.ts', 'src/test-support/**', 'src/fuzz/**', 'src/robustness/**', 'src/bench/**'];
const NO_TOOLING = {
  group: ['**/*.test', '**/*.test.js', '**/*.test-helpers.js', '**/*.test.helpers.js', '**/test-support/*', '**/fuzz/*', '**/robustness/*', '**/bench/*'],
  message: 'Shipped code must not import tests, test helpers, benchmark harnesses or fuzzers (npm pack leaves them out).',
};

/** A format's own modules: above the formats, code reaches them only through the registry and capabilities. */
const FORMAT_INTERNALS = {
  group: ['**/formats/*/*'],
  message: "Operations and edges reach a format through ImageFormat and BlockDevice (check, measure, amend, snapshots, bitmaps...) and builtinFormats(), not through the format's modules.",
};
const NODE = { group: ['node:*'], message: 'The core must run in a browser: put Node-only code in a *.node.ts file.' };

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**'] },
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
    ignores: TOOLING,
    rules: { 'no-restricted-imports': ['error', { patterns: [NO_TOOLING] }] },
  },
  {
    files: ['src/core/**/*.ts', 'src/storage/**/*.ts', 'src/formats/**/*.ts', 'src/crypto/**/*.ts', 'src/compress/**/*.ts', 'src/chain/**/*.ts', 'src/ops/**/*.ts', 'src/browser/**/*.ts', 'src/overlay/**/*.ts'],
    ignores: ['**/*.node.ts', '**/*.test.ts'],
    rules: {
      'no-restricted-imports': ['error', { patterns: [NODE, NO_TOOLING] }],
    },
  },
  // Operations and the edges (CLI, NBD, front ends, pages) above the formats: capabilities only.
  {
    files: ['src/cli/**/*.ts', 'src/nbd/**/*.ts', 'src/compat/**/*.ts', 'src/web/**/*.ts'],
    ignores: TOOLING,
    rules: { 'no-restricted-imports': ['error', { patterns: [NO_TOOLING, FORMAT_INTERNALS] }] },
  },
  {
    files: ['src/ops/**/*.ts', 'src/browser/**/*.ts'],
    ignores: ['**/*.node.ts', ...TOOLING],
    rules: { 'no-restricted-imports': ['error', { patterns: [NODE, NO_TOOLING, FORMAT_INTERNALS] }] },
  },
);
