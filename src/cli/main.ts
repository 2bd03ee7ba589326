#!/usr/bin/env node
/** The CLI from the unbundled build (dist/cli/*.js); the published entry is bin/qcow.cjs. */
import { main } from './entry.js';

await main(process.argv);
