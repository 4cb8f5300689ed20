// SFU transport: livekit-client with its own E2EE worker and a key provider set up as Element
// Call's MatrixKeyProvider (per-participant raw keys imported as HKDF material, ratchet window
// 10, ring 256). Credentials from the authorization service: `/get_token` (MSC4195) for the
// sticky dialect, `/sfu/get` for the state dialect, falling back to the other on 404.
import {
  BaseKeyProvider,
  ConnectionState,
  LocalAudioTrack,
  LocalVideoTrack,
  type RemoteParticipant,
  type RemoteTrack,
  type RemoteTrackPublication,
  Room,
  RoomEvent,
  Track,
} from "livekit-client";
import E2EEWorker from "livekit-client/e2ee-worker?worker";
import type { MatrixClient } from "matrix-js-sdk";

import type { KeyTable } from "./keys.ts";
import type { LocalMedia, MediaTransport, RemoteMedia } from "./media.ts";
import { UserFacingError } from "./matrix.ts";
import { DEFAULT_SLOT_ID } from "./mesh.ts";

class MatrixKeyProvider extends BaseKeyProvider {
  constructor() {
    super({ ratchetWindowSize: 10, keyringSize: 256 });
  }
  async setRaw(identity: string, raw: Uint8Array, index: number): Promise<void> {
    const key = await crypto.subtle.importKey("raw", raw as BufferSource, "HKDF", false, ["deriveBits", "deriveKey"]);
    this.onSetEncryptionKey(key, identity, index);
  }
}

export interface SfuCredentials {
  url: string;
  jwt: string;
  endpoint: "/get_token" | "/sfu/get";
}

export async function sfuCredentials(
  client: MatrixClient,
  serviceUrl: string,
  roomId: string,
  sticky: boolean,
  memberId: string,
): Promise<SfuCredentials> {
  let openid;
  try {
    openid = await client.getOpenIdToken();
  } catch (e) {
    throw new UserFacingError(`The homeserver gave no OpenID token for the call server: ${e instanceof Error ? e.message : e}`);
  }
  const base = serviceUrl.replace(/\/+$/, "");
  const bodies = {
    "/get_token": {
      room_id: roomId,
      slot_id: DEFAULT_SLOT_ID,
      openid_token: openid,
      member: { id: memberId, claimed_user_id: client.getUserId(), claimed_device_id: client.getDeviceId() },
    },
    "/sfu/get": { room: roomId, openid_token: openid, device_id: client.getDeviceId() },
  } as const;
  const order: Array<keyof typeof bodies> = sticky ? ["/get_token", "/sfu/get"] : ["/sfu/get", "/get_token"];
  let last = "";
  for (const endpoint of order) {
    let resp: Response;
    try {
      resp = await fetch(base + endpoint, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(bodies[endpoint]),
      });
    } catch {
      throw new UserFacingError(`The call server's token service at ${base} cannot be reached.`);
    }
    if (resp.status === 404) {
      last = `${endpoint}: 404`;
      continue;
    }
    const text = await resp.text();
    if (!resp.ok) throw new UserFacingError(`The call server's token service refused a token (HTTP ${resp.status}): ${text.slice(0, 200)}`);
    const body = JSON.parse(text) as { url?: string; jwt?: string };
    if (!body.url || !body.jwt) throw new UserFacingError("The call server's token service gave an unusable answer.");
    return { url: body.url, jwt: body.jwt, endpoint };
  }
  throw new UserFacingError(`The call server's token service has no token endpoint (${last}).`);
}

export class SfuTransport implements MediaTransport {
  readonly kind = "sfu" as const;
  readonly room: Room;
  private readonly keyProvider = new MatrixKeyProvider();
  private readonly detachKeys: () => void;
  private readonly remote = new Map<string, RemoteMedia>();
  private published: Array<LocalAudioTrack | LocalVideoTrack> = [];
  private screenTrack?: LocalVideoTrack;
  readonly encryptionErrors: string[] = [];
  failure?: string;
  /** performance.now() since when the connection to the SFU is down (resuming or lost), or null. */
  lostSince: number | null = null;

  /** LiveKit identities whose key the key provider holds: their tracks may be subscribed. */
  private readonly keyed = new Set<string>();

  private constructor(
    private readonly media: LocalMedia,
    keys: KeyTable,
    private readonly onChange: () => void,
    private readonly subscribeAll: boolean,
  ) {
    this.room = new Room({
      encryption: { keyProvider: this.keyProvider, worker: new E2EEWorker() },
      adaptiveStream: false,
      dynacast: true,
    });
    // A remote's tracks are subscribed once its key is in the key provider, as the Python
    // participant does: the SFU asks the sender for a key frame when we subscribe, and that
    // key frame is then one we can decrypt (subscribed before the key, the first key frame
    // is lost and the next one can be a second or more away).
    this.detachKeys = keys.attach((k) => {
      void this.keyProvider.setRaw(k.identity, k.key, k.index).then(() => {
        if (this.keyed.has(k.identity)) return;
        this.keyed.add(k.identity);
        const p = this.room.remoteParticipants.get(k.identity);
        if (p) this.subscribe(p);
      });
    });
    const r = this.room;
    r.on(RoomEvent.TrackPublished, (_pub: RemoteTrackPublication, p: RemoteParticipant) => this.subscribe(p));
    r.on(RoomEvent.TrackSubscribed, (track: RemoteTrack, pub: RemoteTrackPublication, p: RemoteParticipant) => {
      const m = this.entry(p.identity);
      if (track.kind === Track.Kind.Audio) m.audio = track.mediaStreamTrack;
      else if (pub.source === Track.Source.ScreenShare) m.screen = track.mediaStreamTrack;
      else m.video = track.mediaStreamTrack;
      this.refreshMutes(p);
      this.onChange();
    });
    r.on(RoomEvent.TrackUnsubscribed, (track: RemoteTrack, pub: RemoteTrackPublication, p: RemoteParticipant) => {
      const m = this.remote.get(p.identity);
      if (!m) return;
      if (track.kind === Track.Kind.Audio) m.audio = undefined;
      else if (pub.source === Track.Source.ScreenShare) m.screen = undefined;
      else m.video = undefined;
      this.onChange();
    });
    r.on(RoomEvent.TrackMuted, (_pub, p) => {
      if (p !== r.localParticipant) this.refreshMutes(p as RemoteParticipant);
      this.onChange();
    });
    r.on(RoomEvent.TrackUnmuted, (_pub, p) => {
      if (p !== r.localParticipant) this.refreshMutes(p as RemoteParticipant);
      this.onChange();
    });
    r.on(RoomEvent.ParticipantConnected, (p: RemoteParticipant) => {
      this.entry(p.identity);
      this.subscribe(p);
      this.onChange();
    });
    r.on(RoomEvent.ParticipantDisconnected, (p: RemoteParticipant) => {
      this.remote.delete(p.identity);
      this.onChange();
    });
    r.on(RoomEvent.EncryptionError, (e: Error) => {
      if (this.encryptionErrors.length < 100) this.encryptionErrors.push(String(e?.message ?? e));
    });
    r.on(RoomEvent.Reconnecting, () => {
      this.lostSince ??= performance.now();
      this.onChange();
    });
    r.on(RoomEvent.SignalReconnecting, () => {
      this.lostSince ??= performance.now();
      this.onChange();
    });
    r.on(RoomEvent.Reconnected, () => {
      this.lostSince = null;
      this.onChange();
    });
    r.on(RoomEvent.ConnectionStateChanged, (state: ConnectionState) => {
      for (const m of this.remote.values()) m.state = state === ConnectionState.Connected ? "connected" : state;
      this.onChange();
    });
    r.on(RoomEvent.Disconnected, () => {
      if (!this.closing) {
        this.failure = "The connection to the call server (SFU) was lost.";
        this.lostSince ??= performance.now();
      }
      this.onChange();
    });
  }

  private closing = false;

  private entry(identity: string): RemoteMedia {
    let m = this.remote.get(identity);
    if (!m) {
      const receivers = () => {
        const p = this.room.remoteParticipants.get(identity);
        if (!p) return [];
        return [...p.trackPublications.values()]
          .map((pub) => (pub.track as RemoteTrack | undefined)?.receiver)
          .filter((x): x is RTCRtpReceiver => !!x);
      };
      m = { identity, transport: "sfu", audioMuted: false, videoMuted: false, state: "connected", receivers };
      this.remote.set(identity, m);
    }
    return m;
  }

  /** Subscribe to every track of `p` we can decrypt (all of them with `subscribeAll`). */
  private subscribe(p: RemoteParticipant): void {
    if (this.closing || !(this.subscribeAll || this.keyed.has(p.identity))) return;
    for (const pub of p.trackPublications.values()) {
      if (!pub.isSubscribed) pub.setSubscribed(true);
    }
  }

  private refreshMutes(p: RemoteParticipant): void {
    const m = this.entry(p.identity);
    m.audioMuted = p.getTrackPublication(Track.Source.Microphone)?.isMuted ?? false;
    m.videoMuted = p.getTrackPublication(Track.Source.Camera)?.isMuted ?? false;
  }

  static async start(
    creds: SfuCredentials,
    media: LocalMedia,
    keys: KeyTable,
    onChange: () => void,
    opts: { subscribeAll?: boolean } = {},
  ): Promise<SfuTransport> {
    const t = new SfuTransport(media, keys, onChange, !!opts.subscribeAll);
    try {
      await t.room.connect(creds.url, creds.jwt, { autoSubscribe: false });
    } catch (e) {
      await t.close();
      throw new UserFacingError(`The call server (SFU) at ${creds.url} cannot be reached: ${e instanceof Error ? e.message : e}`);
    }
    await t.room.setE2EEEnabled(true);
    for (const p of t.room.remoteParticipants.values()) {
      t.entry(p.identity);
      t.subscribe(p);
    }
    // Remote media flows from here on; our own tracks are published in the background (a
    // slow publication must not hold up receiving, nor a switch to this transport).
    t.publishing = t.publishLocal().catch((e) => {
      t.failure = `Your camera and microphone could not be sent to the call server: ${e instanceof Error ? e.message : e}`;
      onChange();
    });
    return t;
  }

  publishing: Promise<void> = Promise.resolve();

  private async publishLocal(): Promise<void> {
    for (const track of this.media.stream.getTracks()) {
      if (this.closing) return;
      const local =
        track.kind === "video" ? new LocalVideoTrack(track, undefined, true) : new LocalAudioTrack(track, undefined, true);
      this.published.push(local);
      await this.room.localParticipant.publishTrack(local, {
        source: track.kind === "video" ? Track.Source.Camera : Track.Source.Microphone,
        videoCodec: "vp8",
      });
    }
    await this.localChanged();
  }

  get identity(): string {
    return this.room.localParticipant.identity;
  }

  remotes(): Map<string, RemoteMedia> {
    return this.remote;
  }

  senders(): RTCRtpSender[] {
    return this.published.map((t) => t.sender).filter((s): s is RTCRtpSender => !!s);
  }

  async localChanged(): Promise<void> {
    for (const t of this.published) {
      const muted = t.kind === Track.Kind.Audio ? this.media.audioMuted : this.media.videoMuted;
      if (muted && !t.isMuted) await t.mute();
      else if (!muted && t.isMuted) await t.unmute();
    }
    const screen = this.media.screen?.getVideoTracks()[0];
    if (screen && !this.screenTrack) {
      this.screenTrack = new LocalVideoTrack(screen, undefined, true);
      await this.room.localParticipant.publishTrack(this.screenTrack, { source: Track.Source.ScreenShare });
    } else if (!screen && this.screenTrack) {
      await this.room.localParticipant.unpublishTrack(this.screenTrack, false);
      this.screenTrack = undefined;
    }
  }

  /** The SFU is given up on: stop livekit-client's own reconnect attempts at once (were one to
   *  succeed later, under our identity, it would push out the connection that replaces it). */
  abandon(): void {
    this.closing = true;
    void this.room.disconnect(false).catch(() => {});
  }

  async close(): Promise<void> {
    const lost = this.lostSince !== null;
    this.closing = true;
    this.detachKeys();
    // The camera and microphone belong to the call, not to this transport: do not stop them.
    if (!lost) {
      for (const t of this.published) await this.room.localParticipant.unpublishTrack(t, false).catch(() => {});
    }
    await this.room.disconnect(false);
  }
}
