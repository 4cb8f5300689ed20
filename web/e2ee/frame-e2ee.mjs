// Per-sender media E2EE for plain RTCPeerConnections (the mesh path), in LiveKit's frame
// format, done by livekit-client's own E2EE worker (dist/livekit-client.e2ee.worker.mjs), so
// browsers, our Python cryptor (matrixrtc.e2ee) and LiveKit peers share one format and keys.
//
//   const e2ee = new FrameE2EE(new URL('/node_modules/livekit-client/dist/livekit-client.e2ee.worker.mjs', location));
//   await e2ee.setKey(identity, keyBytes, index);     // raw 16-byte sender keys (HKDF), any identity
//   e2ee.encrypt(pc.addTrack(track, stream), { identity: own, trackId: track.id, codec: 'vp8' });
//   pc.ontrack = (ev) => e2ee.decrypt(ev.receiver, { identity: remote, trackId: ev.track.id, codec: 'vp8' });
//
// The peer connection must be created with { encodedInsertableStreams: true } (Chromium's
// createEncodedStreams, which is what livekit-client itself uses there).

/** Element Call's per-participant key provider (MatrixKeyProvider) settings. */
export const ELEMENT_CALL_KEY_PROVIDER = Object.freeze({
  sharedKey: false,
  ratchetSalt: 'LKFrameEncryptionKey',
  ratchetWindowSize: 10,
  failureTolerance: 10,
  keyringSize: 256,
  keySize: 128,
});

export class FrameE2EE {
  /**
   * @param {URL|string} workerUrl livekit-client's e2ee worker module
   * @param {object} keyProviderOptions defaults to Element Call's
   */
  constructor(workerUrl, keyProviderOptions = ELEMENT_CALL_KEY_PROVIDER) {
    this.worker = new Worker(workerUrl, { type: 'module' });
    this.errors = [];
    this.enabled = new Set();
    this.worker.onmessage = (ev) => {
      if (ev.data?.kind === 'error') this.errors.push(String(ev.data.data?.error?.message ?? ev.data.data?.error));
    };
    this.worker.postMessage({ kind: 'init', data: { keyProviderOptions, loglevel: 'warn' } });
  }

  /** Install a raw sender key (HKDF material) for `identity` at `index` and make it current. */
  async setKey(identity, keyBytes, index) {
    const key = await crypto.subtle.importKey('raw', keyBytes, 'HKDF', false, ['deriveBits', 'deriveKey']);
    this.worker.postMessage({
      kind: 'setKey',
      data: { participantIdentity: identity, key, keyIndex: index, updateCurrentKeyIndex: true },
    });
    this.#enable(identity);
  }

  #enable(identity) {
    if (this.enabled.has(identity)) return;
    this.enabled.add(identity);
    this.worker.postMessage({ kind: 'enable', data: { enabled: true, participantIdentity: identity } });
  }

  /**
   * Encrypt what `sender` sends with `identity`'s current key. `tap(frame)`, if given, sees
   * every encrypted frame on its way to the network (tests, statistics).
   */
  encrypt(sender, { identity, trackId, codec, tap }) {
    this.#enable(identity);
    this.#pipe('encode', sender.createEncodedStreams(), { identity, trackId, codec, tap });
  }

  /** Decrypt what `receiver` receives with `identity`'s keys. */
  decrypt(receiver, { identity, trackId, codec, tap }) {
    this.#enable(identity);
    this.#pipe('decode', receiver.createEncodedStreams(), { identity, trackId, codec, tap });
  }

  #pipe(kind, { readable, writable }, { identity, trackId, codec, tap }) {
    let out = writable;
    if (tap) {
      const observer = new TransformStream({
        transform(frame, controller) {
          tap(frame);
          controller.enqueue(frame);
        },
      });
      observer.readable.pipeTo(writable).catch(() => {});
      out = observer.writable;
    }
    this.worker.postMessage(
      {
        kind,
        data: {
          participantIdentity: identity,
          trackId,
          readableStream: readable,
          writableStream: out,
          codec,
          hasPacketTrailer: false,
        },
      },
      [readable, out],
    );
  }

  close() {
    this.worker.terminate();
  }
}
