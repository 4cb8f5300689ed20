// Node 20 entry: runs livekit-client's E2EE worker on the jobs read from stdin (see
// lk_jobs.mjs) and prints {"version": <livekit-client version>, "jobs": {...}}.
import { readFileSync } from 'node:fs';
import { captureHandler, prepareScope, runJobs } from './lk_jobs.mjs';

// The repository's node_modules (npm ci in scripts/bootstrap.sh); livekit-client's exports
// map does not expose the worker bundle, so address it by path.
const pkgDir = new URL('../../node_modules/livekit-client/', import.meta.url);
const pkg = JSON.parse(readFileSync(new URL('package.json', pkgDir), 'utf8'));

const state = prepareScope(globalThis);
await import(new URL('dist/livekit-client.e2ee.worker.mjs', pkgDir).href);
captureHandler(state, globalThis);

const input = JSON.parse(readFileSync(0, 'utf8'));
const jobs = await runJobs(state, input.jobs);
// Exit at once: the worker arms a 2 s watchdog timer whenever a decode pipe ends.
process.stdout.write(JSON.stringify({ version: pkg.version, jobs }), () => process.exit(0));
