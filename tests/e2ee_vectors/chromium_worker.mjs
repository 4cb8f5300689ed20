// Chromium module worker: runs livekit-client's E2EE worker bundle in this same worker scope
// (so Chromium's own WebCrypto does the work) and answers {jobs} with the results.
import { captureHandler, prepareScope, runJobs } from './lk_jobs.mjs';

const state = prepareScope(self);
await import('/node_modules/livekit-client/dist/livekit-client.e2ee.worker.mjs');
captureHandler(state, self);
self.onmessage = async (ev) => {
  try {
    state.post({ jobs: await runJobs(state, ev.data.jobs) });
  } catch (e) {
    state.post({ error: String(e?.stack ?? e) });
  }
};
state.post({ ready: true });
