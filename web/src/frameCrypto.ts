// Per-sender frame E2EE for plain RTCPeerConnections (the mesh), in LiveKit's frame format,
// done by livekit-client's own E2EE worker, so browsers, the Python cryptor (matrixrtc.e2ee)
// and LiveKit peers share one format and one set of keys. Frames go through the worker with
// Chromium's createEncodedStreams, or RTCRtpScriptTransform where that is missing.
// (The same approach as web/e2ee/frame-e2ee.mjs, typed, with script transforms.)
import E2EEWorker from "livekit-client/e2ee-worker?worker";

/** Element Call's per-participant key provider settings (MatrixKeyProvider). */
export const KEY_PROVIDER_OPTIONS = Object.freeze({
  sharedKey: false,
  ratchetSalt: "LKFrameEncryptionKey",
  ratchetWindowSize: 10,
  failureTolerance: 10,
  keyringSize: 256,
  keySize: 128,
});

export type Codec = "vp8" | "opus";

export interface CryptorError {
  identity: string;
  reason: string;
  at: number;
}

export type FrameTransformMode = "script-transform" | "encoded-streams";

/**
 * Chromium has both APIs; there its RTCRtpScriptTransform path decoded only key frames from an
 * aiortc peer (31 frames in 30 s, every delta frame lost, measured with Chromium 156), and
 * livekit-client itself avoids script transforms on Chromium for the same reason
 * (isScriptTransformSupportedForWorker). So: encoded streams where they exist, script
 * transforms elsewhere (Firefox, Safari); `override` forces one for experiments.
 */
export function frameTransformMode(override?: string | null): FrameTransformMode {
  const hasScript = typeof (globalThis as { RTCRtpScriptTransform?: unknown }).RTCRtpScriptTransform !== "undefined";
  const hasEncoded = typeof (RTCRtpSender.prototype as { createEncodedStreams?: unknown }).createEncodedStreams === "function";
  if (override === "script-transform" && hasScript) return "script-transform";
  if (override === "encoded-streams" && hasEncoded) return "encoded-streams";
  return hasEncoded ? "encoded-streams" : "script-transform";
}

export class FrameCrypto {
  private readonly worker: Worker;
  private readonly enabled = new Set<string>();
  readonly errors: CryptorError[] = [];
  /** identity -> number of frames the worker could not decrypt (missing or wrong key). */
  readonly failures = new Map<string, number>();

  constructor(readonly mode: FrameTransformMode) {
    this.worker = new E2EEWorker();
    this.worker.onmessage = (ev: MessageEvent) => {
      const d = ev.data;
      if (d?.kind === "error") {
        const identity = String(d.data?.participantIdentity ?? "");
        const reason = String(d.data?.error?.message ?? d.data?.error ?? "error");
        this.failures.set(identity, (this.failures.get(identity) ?? 0) + 1);
        if (this.errors.length < 200) this.errors.push({ identity, reason, at: Date.now() });
      }
    };
    this.worker.postMessage({ kind: "init", data: { keyProviderOptions: KEY_PROVIDER_OPTIONS, loglevel: "warn" } });
  }

  async setKey(identity: string, raw: Uint8Array, index: number): Promise<void> {
    const key = await crypto.subtle.importKey("raw", raw as BufferSource, "HKDF", false, ["deriveBits", "deriveKey"]);
    this.worker.postMessage({
      kind: "setKey",
      data: { participantIdentity: identity, key, keyIndex: index, updateCurrentKeyIndex: true },
    });
    this.enable(identity);
  }

  private enable(identity: string): void {
    if (this.enabled.has(identity)) return;
    this.enabled.add(identity);
    this.worker.postMessage({ kind: "enable", data: { enabled: true, participantIdentity: identity } });
  }

  /** Encrypt what `sender` sends with `identity`'s current key. `trackId` must be unique per sender. */
  encrypt(sender: RTCRtpSender, identity: string, trackId: string, codec: Codec): void {
    this.enable(identity);
    this.attach(sender, "encode", identity, trackId, codec);
  }

  /** Decrypt what `receiver` receives with `identity`'s keys. */
  decrypt(receiver: RTCRtpReceiver, identity: string, trackId: string, codec: Codec): void {
    this.enable(identity);
    this.attach(receiver, "decode", identity, trackId, codec);
  }

  private attach(
    end: RTCRtpSender | RTCRtpReceiver,
    kind: "encode" | "decode",
    identity: string,
    trackId: string,
    codec: Codec,
  ): void {
    if (this.mode === "script-transform") {
      (end as unknown as { transform: unknown }).transform = new RTCRtpScriptTransform(this.worker, {
        kind,
        participantIdentity: identity,
        trackId,
        codec,
      });
      return;
    }
    const streams = (end as unknown as { createEncodedStreams(): { readable: ReadableStream; writable: WritableStream } })
      .createEncodedStreams();
    this.worker.postMessage(
      {
        kind,
        data: {
          participantIdentity: identity,
          trackId,
          readableStream: streams.readable,
          writableStream: streams.writable,
          codec,
          hasPacketTrailer: false,
        },
      },
      [streams.readable, streams.writable],
    );
  }

  forget(trackId: string, identity: string): void {
    this.worker.postMessage({ kind: "removeTransform", data: { trackId, participantIdentity: identity } });
  }

  close(): void {
    this.worker.terminate();
  }
}
