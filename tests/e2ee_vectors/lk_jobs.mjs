// Drives livekit-client's own E2EE worker (dist/livekit-client.e2ee.worker.mjs) from inside
// the same global scope: Node 20 (livekit_cryptor.mjs) or a Chromium module worker
// (chromium_worker.mjs). The worker bundle is loaded unmodified; we only stand in for what
// a dedicated worker scope offers it and for RTCEncoded*Frame objects. Math.random is pinned
// to 0 so the per-SSRC send counter (the IV's third word) starts at 0: output is reproducible.
//
// jobs: [{id, op: "encode"|"decode", identity, options, kdf: "HKDF"|"PBKDF2",
//         key (base64) | passphrase, key_index, ratchet_before, kind, codec, sif_trailer,
//         frames: [{data (base64), timestamp, ssrc, type}] | decode_from: <earlier job id>}]
// result: {<id>: {frames: [base64 | null], logs: [...]}}

export const b64 = (buf) => {
  const bytes = new Uint8Array(buf);
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
};

export const unb64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0)).buffer;

/** Replace the scope's postMessage before the worker bundle is imported. */
export function prepareScope(scope) {
  const state = { listeners: [], logs: [], handler: null, post: scope.postMessage?.bind(scope) };
  if (!('self' in scope)) scope.self = scope;
  if (!('onmessage' in scope)) scope.onmessage = null;
  scope.postMessage = (msg) => {
    if (msg?.kind === 'log') {
      if (msg.data.level !== 'debug' && msg.data.level !== 'trace') {
        state.logs.push(`${msg.data.level}: ${msg.data.msg}`);
      }
    } else if (msg?.kind === 'error') {
      state.logs.push(`error: ${msg.data.error?.message ?? msg.data.error}`);
    }
    for (const l of state.listeners) l(msg);
  };
  scope.RTCEncodedAudioFrame ??= class RTCEncodedAudioFrame {};
  scope.RTCEncodedVideoFrame ??= class RTCEncodedVideoFrame {};
  Math.random = () => 0;
  return state;
}

/** After the import: take the worker's message handler so that we call it directly. */
export function captureHandler(state, scope) {
  state.handler = scope.onmessage;
  scope.onmessage = null;
}

function send(state, kind, data) {
  state.handler({ data: { kind, data } });
}

function waitFor(state, predicate, trigger) {
  return new Promise((resolve) => {
    const l = (msg) => {
      if (predicate(msg)) {
        state.listeners = state.listeners.filter((x) => x !== l);
        resolve();
      }
    };
    state.listeners.push(l);
    trigger();
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

async function runJob(state, job, results) {
  const options = {
    sharedKey: false,
    ratchetSalt: 'LKFrameEncryptionKey',
    ratchetWindowSize: 10,
    failureTolerance: 10,
    keyringSize: 256,
    keySize: 128,
    ...(job.options ?? {}),
  };
  send(state, 'init', { keyProviderOptions: options, loglevel: 'warn' });
  if (job.sif_trailer) {
    send(state, 'setSifTrailer', { trailer: new Uint8Array(unb64(job.sif_trailer)) });
  }
  send(state, 'setKey', {
    participantIdentity: job.identity,
    isPublisher: job.op === 'encode',
    key: await importMaterial(job),
    keyIndex: job.key_index,
    updateCurrentKeyIndex: true,
  });
  // The worker does not queue ratchet requests (and merges concurrent ones): one at a time.
  for (let i = 0; i < (job.ratchet_before ?? 0); i++) {
    await waitFor(
      state,
      (m) => m?.kind === 'ratchetKey' && m.data.participantIdentity === job.identity,
      () => send(state, 'ratchetRequest', { participantIdentity: job.identity, keyIndex: job.key_index }),
    );
  }
  // Messages are handled in order and 'enable' is echoed back: a barrier.
  await waitFor(
    state,
    (m) => m?.kind === 'enable' && m.data.participantIdentity === job.identity,
    () => send(state, 'enable', { enabled: true, participantIdentity: job.identity }),
  );

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
  const before = state.logs.length;
  send(state, job.op, {
    participantIdentity: job.identity,
    trackId: `track-${job.id}`,
    readableStream: readable,
    writableStream: writable,
    codec: job.kind === 'video' ? job.codec : undefined,
    hasPacketTrailer: false,
  });
  await finished;
  results[job.id] = { frames: out, input: frames, logs: state.logs.slice(before) };
}

export async function runJobs(state, jobs) {
  const results = {};
  for (const job of jobs) await runJob(state, job, results);
  const out = {};
  for (const [id, r] of Object.entries(results)) out[id] = { frames: r.frames, logs: r.logs };
  return out;
}
