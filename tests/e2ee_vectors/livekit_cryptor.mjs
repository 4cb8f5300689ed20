// Runs livekit-client's own E2EE worker (dist/livekit-client.e2ee.worker.mjs) in Node 20 and
// pushes frames through its encode/decode transforms, driven by JSON jobs on stdin.
//
// The worker is loaded unmodified; we only provide what a dedicated worker scope would
// (self, postMessage, onmessage) and stand-ins for RTCEncoded*Frame objects. Math.random is
// pinned to 0 so the per-SSRC send counter (the IV's third word) starts at 0 and the output is
// reproducible byte for byte.
//
// stdin:  {"jobs": [{id, op: "encode"|"decode", identity, options, kdf: "HKDF"|"PBKDF2",
//                    key (base64) | passphrase, key_index, ratchet_before, kind, codec,
//                    sif_trailer (base64), frames: [{data (base64), timestamp, ssrc, type}]
//                    | decode_from: <id of an earlier encode job>}]}
// stdout: {"version": "<livekit-client version>", "jobs": {<id>: {"frames": [base64|null], "logs": [...]}}}
import { readFileSync } from 'node:fs';

// The repository's node_modules (npm ci in scripts/bootstrap.sh); the exports map of
// livekit-client does not expose the worker bundle, so address it by path.
const pkgDir = new URL('../../node_modules/livekit-client/', import.meta.url);
const pkg = JSON.parse(readFileSync(new URL('package.json', pkgDir), 'utf8'));
const workerPath = new URL('dist/livekit-client.e2ee.worker.mjs', pkgDir).href;

let listeners = [];
const logs = [];
globalThis.self = globalThis;
globalThis.onmessage = null;
globalThis.postMessage = (msg) => {
  if (msg?.kind === 'log') {
    if (msg.data.level !== 'debug' && msg.data.level !== 'trace') {
      logs.push(`${msg.data.level}: ${msg.data.msg}`);
    }
  } else if (msg?.kind === 'error') {
    logs.push(`error: ${msg.data.error?.message ?? msg.data.error}`);
  }
  for (const l of listeners) l(msg);
};
globalThis.RTCEncodedAudioFrame = class RTCEncodedAudioFrame {};
globalThis.RTCEncodedVideoFrame = class RTCEncodedVideoFrame {};
Math.random = () => 0;

await import(workerPath);

const b64 = (buf) => Buffer.from(new Uint8Array(buf)).toString('base64');
const unb64 = (s) => {
  const b = Buffer.from(s, 'base64');
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
};

function send(kind, data) {
  globalThis.onmessage({ data: { kind, data } });
}

// The worker handles messages one by one; 'enable' is echoed back, so it serves as a barrier.
function barrier(identity) {
  return new Promise((resolve) => {
    const l = (msg) => {
      if (msg?.kind === 'enable' && msg.data.participantIdentity === identity) {
        listeners = listeners.filter((x) => x !== l);
        resolve();
      }
    };
    listeners.push(l);
    send('enable', { enabled: true, participantIdentity: identity });
  });
}

async function importMaterial(job) {
  if (job.kdf === 'PBKDF2') {
    const bytes = new TextEncoder().encode(job.passphrase);
    return crypto.subtle.importKey('raw', bytes, { name: 'PBKDF2' }, false, [
      'deriveBits',
      'deriveKey',
    ]);
  }
  return crypto.subtle.importKey('raw', unb64(job.key), 'HKDF', false, ['deriveBits', 'deriveKey']);
}

function makeFrame(job, f, i) {
  const audio = job.kind === 'audio';
  const meta = {
    synchronizationSource: f.ssrc,
    payloadType: audio ? 111 : 96,
    mimeType: audio ? 'audio/opus' : `video/${job.codec.toUpperCase()}`,
  };
  const frame = { data: unb64(f.data), timestamp: f.timestamp, getMetadata: () => meta, index: i };
  if (!audio) frame.type = f.type;
  return frame;
}

async function runJob(job, results) {
  const defaults = {
    sharedKey: false,
    ratchetSalt: 'LKFrameEncryptionKey',
    ratchetWindowSize: 10,
    failureTolerance: 10,
    keyringSize: 256,
    keySize: 128,
  };
  const options = { ...defaults, ...(job.options ?? {}) };
  send('init', { keyProviderOptions: options, loglevel: 'warn' });
  if (job.sif_trailer) send('setSifTrailer', { trailer: new Uint8Array(unb64(job.sif_trailer)) });
  const material = await importMaterial(job);
  send('setKey', {
    participantIdentity: job.identity,
    isPublisher: job.op === 'encode',
    key: material,
    keyIndex: job.key_index,
    updateCurrentKeyIndex: true,
  });
  // The worker does not queue ratchet requests (and merges concurrent ones): one at a time.
  for (let i = 0; i < (job.ratchet_before ?? 0); i++) {
    await new Promise((resolve) => {
      const l = (msg) => {
        if (msg?.kind === 'ratchetKey' && msg.data.participantIdentity === job.identity) {
          listeners = listeners.filter((x) => x !== l);
          resolve();
        }
      };
      listeners.push(l);
      send('ratchetRequest', { participantIdentity: job.identity, keyIndex: job.key_index });
    });
  }
  await barrier(job.identity);

  let frames = job.frames;
  if (job.decode_from !== undefined) {
    const src = results[job.decode_from];
    frames = src.frames.map((data, i) => ({ ...src.input[i], data }));
  }
  const out = new Array(frames.length).fill(null);
  let done;
  const finished = new Promise((r) => (done = r));
  const readable = new ReadableStream({
    start(controller) {
      frames.forEach((f, i) => controller.enqueue(makeFrame(job, f, i)));
      controller.close();
    },
  });
  const writable = new WritableStream({
    write(frame) {
      out[frame.index] = b64(frame.data);
    },
    close() {
      done();
    },
  });
  const before = logs.length;
  send(job.op, {
    participantIdentity: job.identity,
    trackId: `track-${job.id}`,
    readableStream: readable,
    writableStream: writable,
    codec: job.kind === 'video' ? job.codec : undefined,
    hasPacketTrailer: false,
  });
  await finished;
  results[job.id] = { frames: out, input: frames, logs: logs.slice(before) };
}

const input = JSON.parse(readFileSync(0, 'utf8'));
const results = {};
for (const job of input.jobs) {
  await runJob(job, results);
}
const jobs = {};
for (const [id, r] of Object.entries(results)) jobs[id] = { frames: r.frames, logs: r.logs };
// exit at once: the worker arms a 2 s watchdog timer when a decode pipe ends.
process.stdout.write(JSON.stringify({ version: pkg.version, jobs }), () => process.exit(0));
