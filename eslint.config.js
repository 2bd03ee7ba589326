// Lint rules. The browser-safe core (core/, storage/ except node-only files, formats/, chain, ops/)
// must not import node: modules; Node-only code lives in files named *.node.ts, cli/, nbd/, bench/
// and test files.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

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
  {
    files: ['src/core/**/*.ts', 'src/storage/**/*.ts', 'src/formats/**/*.ts', 'src/crypto/**/*.ts', 'src/compress/**/*.ts', 'src/chain/**/*.ts', 'src/ops/**/*.ts', 'src/browser/**/*.ts', 'src/overlay/**/*.ts'],
    ignores: ['**/*.node.ts', '**/*.test.ts'],
    rules: {
      'no-restricted-imports': ['error', { patterns: [{ group: ['node:*'], message: 'The core must run in a browser: put Node-only code in a *.node.ts file.' }] }],
    },
  },
);
