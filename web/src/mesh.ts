// Full-mesh transport: one RTCPeerConnection per remote device, MSC2746 to-device signalling
// exactly as the project's mesh engine does it (matrixrtc/mesh/signalling.py, shared/spec/mesh.md):
//
// * who calls whom: the lower user id calls; for the same user the lower device id;
// * every event carries call_id, party_id (our device), version "1", conf_id, device_id,
//   sender_session_id, dest_session_id and a seq counted per call_id from 0;
// * conf_id = the LiveKit room alias of (room, slot): SHA-256 of the JSON array, unpadded base64;
// * a member's session id is `${memberId}.${createdTs}` (a rejoin is a new session);
// * no trickle ICE: offers and answers carry every candidate (aiortc peers need that);
// * Olm-encrypted to-device in encrypted rooms; there, plaintext or a device_id other than the
//   verified Olm sender device is dropped;
// * frames encrypted per sender in LiveKit's format (frameCrypto.ts), keys by backend identity;
//   the peer connection needs `encodedInsertableStreams` when the frames go through Chromium's
//   encoded streams.
import { ClientEvent, type MatrixClient } from "matrix-js-sdk";
import type { ReceivedToDeviceMessage } from "matrix-js-sdk/lib/sync-accumulator.js";

import { FrameCrypto, frameTransformMode } from "./frameCrypto.ts";
import type { KeyTable } from "./keys.ts";
import type { LocalMedia, MediaTransport, RemoteMedia } from "./media.ts";

export const DEFAULT_SLOT_ID = "m.call#ROOM";
const INVITE_LIFETIME_MS = 60_000;
// An unanswered invite is hung up (invite_timeout) and placed again: the peer may have
// dropped it (e.g. it addressed a session the peer had not seen itself join yet).
const INVITE_TIMEOUT_MS = 8_000;
const RETRY_MS = 2_000;
const MAX_RETRIES = 6; // per peer session, reset once media connects
const GATHER_LIMIT_MS = 3_000;

export interface MeshMember {
  userId: string;
  deviceId: string;
  sessionId: string;
  identity: string; // backend identity (frame keys)
}

export interface MeshLocal extends MeshMember {
  roomId: string;
  encryptedSignalling: boolean;
}

type Direction = "outbound" | "inbound";

interface Call {
  callId: string;
  peer: MeshMember;
  direction: Direction;
  pc: RTCPeerConnection;
  seq: number;
  remote: RemoteMedia;
  streamPurpose: Map<string, string>; // msid stream id -> purpose
  ended: boolean;
}

export function wantsOutgoingCall(local: { userId: string; deviceId: string }, remote: { userId: string; deviceId: string }): boolean {
  if (remote.userId !== local.userId) return remote.userId > local.userId;
  return remote.deviceId > local.deviceId;
}

/** Go's json.Marshal of a []string: JSON with <, >, &, U+2028 and U+2029 escaped. */
function goJsonStringArray(parts: string[]): string {
  return JSON.stringify(parts).replace(/[<>&\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

export async function meshConfId(roomId: string, slotId = DEFAULT_SLOT_ID): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(goJsonStringArray([roomId, slotId])));
  return btoa(String.fromCharCode(...new Uint8Array(digest))).replace(/=+$/, "");
}

function peerKey(m: { userId: string; deviceId: string }): string {
  return `${m.userId}|${m.deviceId}`;
}

function newCallId(): string {
  return `${Date.now()}${Math.random().toString(36).slice(2, 10)}`;
}

export class MeshTransport implements MediaTransport {
  readonly kind = "mesh" as const;
  private readonly calls = new Map<string, Call>(); // peer key -> call
  private readonly members = new Map<string, MeshMember>(); // peer key -> member
  private readonly retries = new Map<string, { n: number; timer?: number }>();
  private readonly pendingInvites = new Map<string, { sender: string; content: Record<string, unknown>; at: number }>();
  readonly crypto: FrameCrypto;
  readonly log: string[] = [];
  private detachKeys: () => void;
  private closed = false;
  failure?: string;

  private constructor(
    private readonly client: MatrixClient,
    private readonly local: MeshLocal,
    private readonly confId: string,
    private readonly media: LocalMedia,
    keys: KeyTable,
    private readonly onChange: () => void,
  ) {
    this.crypto = new FrameCrypto(frameTransformMode(new URLSearchParams(location.search).get("frame_transform")));
    this.detachKeys = keys.attach((k) => void this.crypto.setKey(k.identity, k.key, k.index));
    client.on(ClientEvent.ReceivedToDeviceMessage, this.onToDevice);
  }

  /** `early`: signalling that arrived before this transport existed (a peer that switched to
   *  the mesh a moment before us may already have invited us); replayed once members are set. */
  static async start(
    client: MatrixClient,
    local: MeshLocal,
    media: LocalMedia,
    keys: KeyTable,
    onChange: () => void,
    early: readonly ReceivedToDeviceMessage[] = [],
  ): Promise<MeshTransport> {
    const t = new MeshTransport(client, local, await meshConfId(local.roomId), media, keys, onChange);
    t.early = [...early];
    return t;
  }

  private early: ReceivedToDeviceMessage[] = [];

  get sessionId(): string {
    return this.local.sessionId;
  }

  private note(line: string): void {
    this.log.push(`${new Date().toISOString().slice(11, 23)} ${line}`);
    if (this.log.length > 300) this.log.splice(0, 100);
  }

  remotes(): Map<string, RemoteMedia> {
    const out = new Map<string, RemoteMedia>();
    for (const call of this.calls.values()) out.set(call.peer.identity, call.remote);
    return out;
  }

  senders(): RTCRtpSender[] {
    return [...this.calls.values()].flatMap((c) => c.pc.getSenders());
  }

  /** The mesh members other than us (every one advertises the mesh transport). */
  setMembers(members: MeshMember[]): void {
    if (this.closed) return;
    const wanted = new Map(members.filter((m) => peerKey(m) !== peerKey(this.local)).map((m) => [peerKey(m), m]));
    for (const [key, call] of this.calls) {
      const m = wanted.get(key);
      if (!m) {
        this.endCall(call, null); // left: nothing to tell
      } else if (m.sessionId !== call.peer.sessionId) {
        this.endCall(call, "new_session");
      }
    }
    this.members.clear();
    for (const [key, m] of wanted) this.members.set(key, m);
    const early = this.early;
    this.early = [];
    for (const msg of early) this.onToDevice(msg);
    for (const [key, m] of wanted) {
      const pending = this.pendingInvites.get(key);
      if (pending) {
        this.pendingInvites.delete(key);
        void this.onInvite(pending.sender, pending.content, Date.now() - pending.at);
      }
      if (!this.calls.has(key) && wantsOutgoingCall(this.local, m)) void this.placeCall(m);
    }
    this.onChange();
  }

  private envelope(call: Call): Record<string, unknown> {
    const seq = call.seq++;
    return {
      call_id: call.callId,
      party_id: this.local.deviceId,
      version: "1",
      conf_id: this.confId,
      device_id: this.local.deviceId,
      sender_session_id: this.local.sessionId,
      dest_session_id: call.peer.sessionId,
      seq,
    };
  }

  private metadata(): Record<string, unknown> {
    const out: Record<string, unknown> = {
      [this.media.stream.id]: {
        purpose: "m.usermedia",
        audio_muted: this.media.audioMuted,
        video_muted: this.media.videoMuted,
      },
    };
    return out;
  }

  private async send(peer: MeshMember, type: string, content: Record<string, unknown>): Promise<void> {
    if (this.local.encryptedSignalling) {
      await this.client.encryptAndSendToDevice(type, [{ userId: peer.userId, deviceId: peer.deviceId }], content);
    } else {
      await this.client.sendToDevice(type, new Map([[peer.userId, new Map([[peer.deviceId, content]])]]));
    }
  }

  private newPeerConnection(call: Omit<Call, "pc">): RTCPeerConnection {
    const pc = new RTCPeerConnection({
      iceServers: [],
      bundlePolicy: "max-bundle",
      ...(this.crypto.mode === "encoded-streams" ? { encodedInsertableStreams: true } : {}),
    } as RTCConfiguration);
    pc.ontrack = (ev) => {
      const codec = ev.track.kind === "video" ? "vp8" : "opus";
      this.crypto.decrypt(ev.receiver, call.peer.identity, `${call.callId}:${ev.track.id}`, codec);
      const streamId = ev.streams[0]?.id ?? "";
      const purpose = (call as Call).streamPurpose.get(streamId) ?? "m.usermedia";
      if (ev.track.kind === "audio") call.remote.audio = ev.track;
      else if (purpose === "m.screenshare") call.remote.screen = ev.track;
      else call.remote.video = ev.track;
      this.onChange();
    };
    pc.onconnectionstatechange = () => {
      call.remote.state = pc.connectionState;
      if (pc.connectionState === "connected") this.retries.delete(peerKey(call.peer));
      if (pc.connectionState === "failed" && !(call as Call).ended) {
        this.note(`ice failed with ${peerKey(call.peer)}`);
        this.endCall(call as Call, "ice_failed");
      }
      this.onChange();
    };
    return pc;
  }

  private addLocalTracks(call: Call): void {
    for (const track of this.media.stream.getTracks()) {
      const sender = call.pc.addTrack(track, this.media.stream);
      const codec = track.kind === "video" ? "vp8" : "opus";
      this.crypto.encrypt(sender, this.local.identity, `${call.callId}:${track.id}`, codec);
    }
  }

  private preferVp8(pc: RTCPeerConnection): void {
    const caps = RTCRtpReceiver.getCapabilities?.("video");
    if (!caps) return;
    const vp8 = caps.codecs.filter((c) => c.mimeType.toLowerCase() === "video/vp8");
    const rest = caps.codecs.filter((c) => c.mimeType.toLowerCase() !== "video/vp8");
    for (const t of pc.getTransceivers()) {
      if (t.receiver.track.kind === "video") {
        try {
          t.setCodecPreferences([...vp8, ...rest]);
        } catch {
          /* keep the default order */
        }
      }
    }
  }

  private async gathered(pc: RTCPeerConnection): Promise<void> {
    if (pc.iceGatheringState === "complete") return;
    await new Promise<void>((resolve) => {
      const done = () => {
        if (pc.iceGatheringState === "complete") resolve();
      };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, GATHER_LIMIT_MS);
    });
  }

  private makeCall(peer: MeshMember, callId: string, direction: Direction): Call {
    const remote: RemoteMedia = {
      identity: peer.identity,
      transport: "mesh",
      audioMuted: false,
      videoMuted: false,
      state: "connecting",
      receivers: () => (call.pc.getReceivers ? call.pc.getReceivers() : []),
    };
    const partial = { callId, peer, direction, seq: 0, remote, streamPurpose: new Map<string, string>(), ended: false };
    const call = partial as Call;
    call.pc = this.newPeerConnection(partial);
    return call;
  }

  private async placeCall(peer: MeshMember): Promise<void> {
    const key = peerKey(peer);
    if (this.closed || this.calls.has(key)) return;
    const call = this.makeCall(peer, newCallId(), "outbound");
    this.calls.set(key, call);
    this.note(`calling ${key} (${call.callId})`);
    try {
      this.addLocalTracks(call);
      this.preferVp8(call.pc);
      await call.pc.setLocalDescription(await call.pc.createOffer());
      await this.gathered(call.pc);
      if (call.ended) return;
      const meta = this.metadata();
      await this.send(peer, "m.call.invite", {
        ...this.envelope(call),
        offer: { type: "offer", sdp: call.pc.localDescription!.sdp },
        lifetime: INVITE_LIFETIME_MS,
        invitee: peer.userId,
        capabilities: { "m.call.transferee": false, "m.call.dtmf": false },
        sdp_stream_metadata: meta,
        "org.matrix.msc3077.sdp_stream_metadata": meta,
      });
      setTimeout(() => {
        if (!call.ended && call.pc.remoteDescription === null) this.endCall(call, "invite_timeout");
      }, INVITE_TIMEOUT_MS);
    } catch (e) {
      this.note(`invite to ${key} failed: ${e}`);
      this.endCall(call, "create_offer");
    }
  }

  private scheduleRetry(peer: MeshMember): void {
    const key = peerKey(peer);
    const r = this.retries.get(key) ?? { n: 0 };
    if (r.n >= MAX_RETRIES || r.timer !== undefined) return;
    r.n += 1;
    r.timer = window.setTimeout(() => {
      r.timer = undefined;
      const m = this.members.get(key);
      if (m && m.sessionId === peer.sessionId && !this.calls.has(key)) void this.placeCall(m);
    }, RETRY_MS);
    this.retries.set(key, r);
  }

  /** Close a call; `reason` null: no hangup is sent (the peer left). */
  private endCall(call: Call, reason: string | null): void {
    if (call.ended) return;
    call.ended = true;
    const key = peerKey(call.peer);
    if (this.calls.get(key) === call) this.calls.delete(key);
    if (reason !== null && !this.closed) {
      void this.send(call.peer, "m.call.hangup", { ...this.envelope(call), reason }).catch(() => {});
    }
    call.pc.close();
    this.note(`ended ${key} (${call.callId}): ${reason ?? "left"}`);
    const member = this.members.get(key);
    if (!this.closed && member && member.sessionId === call.peer.sessionId && wantsOutgoingCall(this.local, member)) {
      this.scheduleRetry(member);
    }
    this.onChange();
  }

  private readonly onToDevice = (msg: ReceivedToDeviceMessage): void => {
    if (this.closed) return;
    const { message, encryptionInfo } = msg;
    const type = message.type;
    if (!type.startsWith("m.call.") && !type.startsWith("org.matrix.call.")) return;
    const content = (message.content ?? {}) as Record<string, unknown>;
    if (content.conf_id !== this.confId) return;
    if (typeof content.device_id !== "string") return;
    if (this.local.encryptedSignalling && !encryptionInfo) {
      this.note(`dropped plaintext ${type} from ${message.sender} in an encrypted room`);
      return;
    }
    if (encryptionInfo && encryptionInfo.senderDevice !== content.device_id) {
      this.note(`dropped ${type}: device_id is not the Olm sender device`);
      return;
    }
    if (content.dest_session_id !== this.local.sessionId) return;
    void this.handle(message.sender, type.replace(/^org\.matrix\.call\./, "m.call."), content).catch((e) =>
      this.note(`${type} from ${message.sender}: ${e}`),
    );
  };

  private async handle(sender: string, type: string, c: Record<string, unknown>): Promise<void> {
    if (type === "m.call.invite") return this.onInvite(sender, c, 0);
    const key = `${sender}|${c.device_id}`;
    const call = this.calls.get(key);
    if (!call || call.callId !== c.call_id) return;
    switch (type) {
      case "m.call.answer": {
        if (call.direction !== "outbound" || call.pc.remoteDescription) return;
        this.readMetadata(call, c);
        await call.pc.setRemoteDescription(c.answer as RTCSessionDescriptionInit);
        await this.send(call.peer, "m.call.select_answer", { ...this.envelope(call), selected_party_id: c.party_id });
        this.onChange();
        return;
      }
      case "m.call.candidates": {
        for (const cand of (c.candidates as RTCIceCandidateInit[] | undefined) ?? []) {
          await call.pc.addIceCandidate(cand).catch(() => {});
        }
        return;
      }
      case "m.call.select_answer":
        if (c.selected_party_id !== this.local.deviceId) this.endCall(call, null);
        return;
      case "m.call.sdp_stream_metadata_changed":
        this.readMetadata(call, c);
        this.onChange();
        return;
      case "m.call.hangup":
      case "m.call.reject":
        this.endCall(call, null);
        return;
      default:
        return;
    }
  }

  private readMetadata(call: Call, c: Record<string, unknown>): void {
    const meta = (c.sdp_stream_metadata ?? c["org.matrix.msc3077.sdp_stream_metadata"]) as
      | Record<string, { purpose?: string; audio_muted?: boolean; video_muted?: boolean }>
      | undefined;
    if (!meta) return;
    for (const [streamId, m] of Object.entries(meta)) {
      call.streamPurpose.set(streamId, m.purpose ?? "m.usermedia");
      if ((m.purpose ?? "m.usermedia") === "m.usermedia") {
        call.remote.audioMuted = !!m.audio_muted;
        call.remote.videoMuted = !!m.video_muted;
      }
    }
  }

  private async onInvite(sender: string, c: Record<string, unknown>, heldMs: number): Promise<void> {
    const key = `${sender}|${c.device_id}`;
    const lifetime = typeof c.lifetime === "number" ? c.lifetime : INVITE_LIFETIME_MS;
    if (heldMs > lifetime - 3000) return;
    const member = this.members.get(key);
    if (!member || member.sessionId !== c.sender_session_id) {
      // Not (yet) a member under that session: hold the invite until its membership arrives.
      this.pendingInvites.set(key, { sender, content: c, at: Date.now() - heldMs });
      return;
    }
    const existing = this.calls.get(key);
    if (existing) {
      // Glare: we are inviting the same device; the lower call_id wins.
      if (existing.direction === "outbound" && !existing.pc.remoteDescription && existing.callId < String(c.call_id)) {
        return;
      }
      this.endCall(existing, "replaced");
    }
    const call = this.makeCall(member, String(c.call_id), "inbound");
    this.calls.set(key, call);
    this.note(`answering ${key} (${call.callId})`);
    this.readMetadata(call, c);
    try {
      await call.pc.setRemoteDescription(c.offer as RTCSessionDescriptionInit);
      this.addLocalTracks(call);
      this.preferVp8(call.pc);
      await call.pc.setLocalDescription(await call.pc.createAnswer());
      await this.gathered(call.pc);
      if (call.ended) return;
      const meta = this.metadata();
      await this.send(member, "m.call.answer", {
        ...this.envelope(call),
        answer: { type: "answer", sdp: call.pc.localDescription!.sdp },
        capabilities: { "m.call.transferee": false, "m.call.dtmf": false },
        sdp_stream_metadata: meta,
        "org.matrix.msc3077.sdp_stream_metadata": meta,
      });
    } catch (e) {
      this.note(`answer to ${key} failed: ${e}`);
      this.endCall(call, "create_answer");
    }
    this.onChange();
  }

  async localChanged(): Promise<void> {
    const meta = this.metadata();
    await Promise.all(
      [...this.calls.values()].map((call) =>
        this.send(call.peer, "m.call.sdp_stream_metadata_changed", {
          ...this.envelope(call),
          sdp_stream_metadata: meta,
          "org.matrix.msc3077.sdp_stream_metadata": meta,
        }).catch(() => {}),
      ),
    );
  }

  async close(): Promise<void> {
    if (this.closed) return;
    const calls = [...this.calls.values()];
    await Promise.all(
      calls.map((call) => this.send(call.peer, "m.call.hangup", { ...this.envelope(call), reason: "user_hangup" }).catch(() => {})),
    );
    this.closed = true;
    for (const call of calls) {
      call.ended = true;
      call.pc.close();
    }
    this.calls.clear();
    for (const r of this.retries.values()) if (r.timer !== undefined) clearTimeout(r.timer);
    this.client.off(ClientEvent.ReceivedToDeviceMessage, this.onToDevice);
    this.detachKeys();
    this.crypto.close();
  }
}
