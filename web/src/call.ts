// One call in one room: matrix-js-sdk's MatrixRTCSession for memberships and media keys, and
// the media transport the policy picks (mesh or SFU), switched live make-before-break.
import { ClientEvent, EventType, type MatrixClient, type Room } from "matrix-js-sdk";
import { CryptoEvent } from "matrix-js-sdk/lib/crypto-api/index.js";
import type { ReceivedToDeviceMessage } from "matrix-js-sdk/lib/sync-accumulator.js";
import {
  type CallMembership,
  MatrixRTCSession,
  MatrixRTCSessionEvent,
  isMyMembership,
} from "matrix-js-sdk/lib/matrixrtc/index.js";

import type { LivekitFocus } from "./discovery.ts";
import { KeyTable } from "./keys.ts";
import { type LocalMedia, type MediaTransport, type ReceiverStats, type RemoteMedia, receiverStats } from "./media.ts";
import { type MeshMember, MeshTransport } from "./mesh.ts";
import { MESH_TRANSPORT_TYPE, type MediaKind, chooseMedia } from "./policy.ts";
import { SfuTransport, sfuCredentials } from "./sfu.ts";

export type TransportPreference = "auto" | "mesh" | "sfu";

export interface CallOptions {
  sticky: boolean; // MSC4354 sticky m.rtc.member (matrix 2.0) instead of state call.member
  focus: LivekitFocus | null;
  prefer: TransportPreference;
  meshMax: number;
  ring: boolean;
  keyless?: boolean; // drop others' media keys (tests: a participant without the keys)
}

export interface Participant {
  identity: string;
  userId: string;
  deviceId: string;
  name: string;
  membership: CallMembership;
  media?: RemoteMedia;
  stats?: ReceiverStats & { kbps: number };
  keyIndex?: number;
  e2ee: "decrypting" | "undecryptable" | "waiting-for-key" | "waiting-for-media";
  speaking: boolean;
  audioLevelMax: number; // loudest remote audio heard so far (0..1)
}

export interface SwitchRecord {
  from: MediaKind | null;
  to: MediaKind;
  reason: string;
  startedAt: number;
  doneAt?: number;
}

const SETTLE_LIMIT_MS = 6000;
// To-device, Olm-encrypted: "I receive your media over <kind>" (matrixrtc/switching.py
// SWITCH_ACK_TYPE; project-private, no MSC defines a switch).
const MEDIA_RECEIVED = "org.matrixrtc.media_received";
// SFU failure, as the Python switcher (matrixrtc/switching.py): an SFU connection down this long
// makes the SFU unreachable for the policy; a token request is tried this often until one
// succeeds (the authorization service hands out tokens only once LiveKit has the room again).
const SFU_FAIL_AFTER_MS = 1000;
const SFU_PROBE_MS = 2000;
// How long mesh signalling is kept for a mesh transport that starts after it arrived.
const EARLY_SIGNALLING_MS = 10_000;
const SFU_LOST_NOTICE = "The call server (SFU) cannot be reached: the call goes on as a mesh while everyone can mesh.";

export class Call {
  readonly session: MatrixRTCSession;
  readonly keys = new KeyTable();
  readonly memberId: string;
  transport: MediaTransport | null = null;
  private old: MediaTransport | null = null;
  kind: MediaKind | null = null;
  participants: Participant[] = [];
  own?: CallMembership;
  switches: SwitchRecord[] = [];
  error: string | null = null;
  private switching: Promise<void> | null = null;
  /** Our SFU connection was lost and no probe has got through since (policy input). */
  sfuUnreachable = false;
  private sfuProbeTimer?: number;
  private probing = false;
  /** The current SFU transport is dead and must be replaced by a new connection. */
  private replaceSfu = false;
  private wantedKind: MediaKind | null = null;
  private statsTimer?: number;
  private gapTimer?: number;
  /** Per participant: when a video frame was last decoded on any transport, and the longest
   *  time without one since the first (what a switch costs a person watching). */
  readonly frameClock = new Map<
    string,
    { first: number; last: number; maxGapMs: number; counts: Map<RTCRtpReceiver, number>; gaps: Array<[number, number]> }
  >();
  /** performance.now() when join() was called. */
  joinedAt = 0;
  private joinedWall = 0;
  private prevBytes = new Map<string, { at: number; bytes: number }>();
  private left = false;
  readonly listeners = new Set<() => void>();
  readonly encrypted: boolean;
  /** Sticky form in an encrypted room: the devices (`user|device`) our crypto knew just before
   *  our current membership event was sent, so the only ones its Megolm session can have gone
   *  to (null until it is sent). See resendForNewDevices. */
  private membershipReaders: Set<string> | null = null;
  /** Devices our membership was sent again for, and when (snapshot: membershipResends). */
  private readonly resentFor = new Set<string>();
  private readonly resends: Array<{ at: number; devices: string[] }> = [];
  private resending = false;

  constructor(
    readonly client: MatrixClient,
    readonly room: Room,
    readonly media: LocalMedia,
    readonly options: CallOptions,
  ) {
    this.session = client.matrixRTC.getRoomSession(room);
    this.memberId = `${client.getUserId()}:${client.getDeviceId()}`;
    this.encrypted = room.hasEncryptionStateEvent();
  }

  private changed = (): void => {
    for (const l of this.listeners) l();
  };

  /** The transports we advertise in our membership, LiveKit first (Element Call reads [0]). */
  advertised(): Array<Record<string, unknown> & { type: string }> {
    const out: Array<Record<string, unknown> & { type: string }> = [];
    const { focus, prefer, sticky } = this.options;
    if (focus && prefer !== "mesh") out.push({ ...focus });
    // js-sdk's sticky membership publishes only its LiveKit transport; advertiseMeshWhenSticky
    // adds the mesh one (without an SFU a sticky member cannot join through js-sdk at all).
    if ((!sticky || focus) && prefer !== "sfu") out.push({ type: MESH_TRANSPORT_TYPE });
    return out;
  }

  join(): void {
    this.joinedAt = performance.now();
    this.joinedWall = Date.now();
    this.session.on(MatrixRTCSessionEvent.MembershipsChanged, this.onMemberships);
    this.session.on(MatrixRTCSessionEvent.EncryptionKeyChanged, this.onKey);
    this.client.on(ClientEvent.ReceivedToDeviceMessage, this.onToDevice);
    this.session.on(MatrixRTCSessionEvent.MembershipManagerError, (e: unknown) => {
      this.error = `Your call membership could not be kept up: ${e instanceof Error ? e.message : e}`;
      this.changed();
    });
    const advertised = this.advertised();
    if (advertised.length === 0) {
      this.error = "This homeserver offers no call server (SFU), and mesh calls are switched off.";
    }
    const identity = { userId: this.client.getUserId()!, deviceId: this.client.getDeviceId()!, memberId: this.memberId };
    const config = {
      manageMediaKeys: true,
      unstableSendStickyEvents: this.options.sticky,
      callIntent: "video",
      notificationType: this.options.ring ? ("ring" as const) : undefined,
      useKeyDelay: 1000,
      delayedLeaveEventDelayMs: 8000,
    };
    if (this.options.sticky) {
      // js-sdk's sticky member publishes exactly the transport given as its multi-SFU focus.
      if (!this.options.focus) {
        this.error = "The Matrix 2.0 membership form needs a call server (SFU), and this homeserver offers none.";
        this.changed();
        return;
      }
      this.session.joinRTCSession(identity, [], { ...this.options.focus }, config);
      if (this.options.prefer !== "sfu") advertiseMeshWhenSticky(this.session);
      if (this.encrypted) {
        noteReadersOnSend(this.session, () => this.knownDevices(), (readers) => {
          this.membershipReaders = readers;
        });
        this.client.on(CryptoEvent.DevicesUpdated, this.onDevicesUpdated);
      }
    } else {
      this.session.joinRTCSession(identity, advertised, undefined, config);
    }
    this.statsTimer = window.setInterval(() => void this.refreshStats(), 1000);
    this.gapTimer = window.setInterval(() => {
      this.watchSfu();
      void this.watchFrames();
    }, 100);
    this.onMemberships();
  }

  /** Mesh signalling (MSC2746 to-device) of the last few seconds, for a mesh we start late. */
  private readonly signalling: Array<{ at: number; msg: ReceivedToDeviceMessage }> = [];
  private meshEndedAt = 0;

  private readonly onToDevice = (msg: ReceivedToDeviceMessage): void => {
    const type = msg.message.type;
    if (!type.startsWith("m.call.") && !type.startsWith("org.matrix.call.")) return;
    const now = performance.now();
    this.signalling.push({ at: now, msg });
    while (this.signalling.length > 50 || (this.signalling.length && now - this.signalling[0].at > EARLY_SIGNALLING_MS)) {
      this.signalling.shift();
    }
  };

  private recentSignalling(): ReceivedToDeviceMessage[] {
    const now = performance.now();
    // Not what our previous mesh (same session id) already handled.
    return this.signalling.filter((s) => now - s.at <= EARLY_SIGNALLING_MS && s.at > this.meshEndedAt).map((s) => s.msg);
  }

  private readonly onKey = (
    key: Uint8Array,
    index: number,
    membership: { userId: string; deviceId: string },
    identity: string,
  ): void => {
    const own = membership.userId === this.client.getUserId() && membership.deviceId === this.client.getDeviceId();
    if (this.options.keyless && !own) return;
    this.keys.set({
      identity,
      index,
      key,
      userId: membership.userId,
      deviceId: membership.deviceId,
      receivedAt: Date.now(),
    });
    this.changed();
  };

  private displayName(userId: string): string {
    return this.room.getMember(userId)?.rawDisplayName || userId;
  }

  private readonly onMemberships = (): void => {
    if (this.left) return;
    const me = this.client.getUserId()!;
    const device = this.client.getDeviceId()!;
    const memberships = this.session.memberships.filter((m) => !m.isExpired());
    this.own = memberships.find((m) => isMyMembership(m, me, device));
    const byIdentity = new Map(this.participants.map((p) => [p.identity, p]));
    this.participants = memberships
      .filter((m) => !isMyMembership(m, me, device))
      .map((m) => {
        const prev = byIdentity.get(m.rtcBackendIdentity);
        return {
          identity: m.rtcBackendIdentity,
          userId: m.sender,
          deviceId: m.deviceId,
          name: this.displayName(m.sender),
          membership: m,
          stats: prev?.stats,
          keyIndex: prev?.keyIndex,
          e2ee: prev?.e2ee ?? "waiting-for-media",
          speaking: prev?.speaking ?? false,
          audioLevelMax: prev?.audioLevelMax ?? 0,
        };
      });
    // Until our own membership comes back from the homeserver, decide as if it were there
    // (the transports we advertise): an SFU connection can start at once; the mesh needs our
    // membership's created_ts for its session id, so it waits for it.
    const lists = memberships.map((m) => m.transports);
    if (!this.own) lists.push(this.advertised());
    const kind =
      this.options.prefer === "auto" ? chooseMedia(lists, this.options.meshMax, !this.sfuUnreachable) : this.forced(lists);
    if (this.own || (kind === "sfu" && !this.transport)) {
      this.wantedKind = kind;
      void this.reconcile();
    }
    this.attachMedia();
    this.changed();
    void this.resendForNewDevices();
  };

  private readonly onDevicesUpdated = (): void => {
    void this.resendForNewDevices();
  };

  /** The devices our crypto knows (Rust crypto's store; downloaded for users it does not track
   *  yet) of `userIds`, by default the room's joined members and every call member. Rust crypto
   *  waits up to 1 s per user whose device list is stale until it is queried: the query is
   *  started first (prepareToEncrypt), and the users are asked in parallel. */
  private async knownDevices(userIds?: string[]): Promise<Set<string>> {
    const crypto = this.client.getCrypto();
    if (!crypto) return new Set();
    const users = userIds ?? [
      ...new Set([...this.room.getJoinedMembers().map((m) => m.userId), ...this.session.memberships.map((m) => m.sender)]),
    ];
    crypto.prepareToEncrypt(this.room);
    const out = new Set<string>();
    const maps = await Promise.all(users.filter((u): u is string => !!u).map((u) => crypto.getUserDeviceInfo([u], true)));
    for (const devices of maps) for (const [user, byId] of devices) for (const id of byId.keys()) out.add(`${user}|${id}`);
    return out;
  }

  /** Sticky form in an encrypted room: our m.rtc.member is a Megolm-encrypted room event. Its
   *  room key went only to the devices our crypto knew when it was sent, so a member whose
   *  device appeared later (logged in just before joining) can never decrypt it and never sees
   *  us: no membership, so no media key from it to us and none from us to it (js-sdk sends it
   *  again only hourly). Send it again, once per such member device, as soon as our crypto
   *  knows the device (the new event's session then goes to it); the Python agent does the same
   *  (matrixrtc/agent.py _resend_for_new_devices). */
  private async resendForNewDevices(): Promise<void> {
    const readers = this.membershipReaders;
    if (!readers || this.resending || this.left || !this.own) return;
    const key = (p: Participant): string => `${p.userId}|${p.deviceId}`;
    const unread = this.participants.filter((p) => !readers.has(key(p)) && !this.resentFor.has(key(p)));
    if (unread.length === 0) return;
    this.resending = true;
    let sent = false;
    try {
      // Only devices our crypto knows now: the others are tried again on DevicesUpdated.
      const known = await this.knownDevices([...new Set(unread.map((p) => p.userId))]);
      const ready = unread.filter((p) => known.has(key(p))).map(key);
      if (ready.length === 0 || this.left) return;
      for (const k of ready) this.resentFor.add(k);
      this.resends.push({ at: Math.round(performance.now() - this.joinedAt), devices: ready });
      const manager = (this.session as unknown as { membershipManager?: { sendJoinEvent?: () => Promise<unknown> } })
        .membershipManager;
      if (!manager?.sendJoinEvent) throw new Error("js-sdk's membership manager has no sendJoinEvent");
      await manager.sendJoinEvent.call(manager);
      sent = true;
    } catch (e) {
      console.warn("could not send our call membership again for new devices", e);
    } finally {
      this.resending = false;
    }
    // Someone may have joined while we were sending.
    if (sent) void this.resendForNewDevices();
  }

  private forced(lists: Array<Array<{ type: string }>>): MediaKind {
    if (this.options.prefer === "sfu") return this.options.focus ? "sfu" : "none";
    const allMesh = lists.every((ts) => ts.some((t) => t.type === MESH_TRANSPORT_TYPE));
    return allMesh ? "mesh" : "none";
  }

  private meshMembers(): MeshMember[] {
    return this.session.memberships
      .filter((m) => !m.isExpired() && m.transports.some((t) => t.type === MESH_TRANSPORT_TYPE))
      .map((m) => ({
        userId: m.sender,
        deviceId: m.deviceId,
        sessionId: `${m.memberId}.${m.createdTs()}`,
        identity: m.rtcBackendIdentity,
      }));
  }

  /** The SFU to use: the oldest member's LiveKit transport (oldest_membership), else ours. */
  private sfuServiceUrl(): string | null {
    const oldest = this.session.getOldestMembership();
    const t = oldest?.transports.find((x) => x.type === "livekit");
    const url = t?.livekit_service_url;
    if (typeof url === "string") return url;
    return this.options.focus?.livekit_service_url ?? null;
  }

  private async reconcile(): Promise<void> {
    if (this.switching) {
      await this.switching;
    }
    if (this.left) return;
    const wanted = this.wantedKind;
    if (wanted === null) return;
    if (wanted === this.kind && this.transport && !(wanted === "sfu" && this.replaceSfu)) {
      if (this.transport instanceof MeshTransport) this.transport.setMembers(this.meshMembers());
      return;
    }
    if (wanted === "none") {
      if (this.participants.length > 0) {
        this.error = "Nobody in this call offers a transport every member can use (no SFU, and not everyone can do mesh).";
      }
      this.changed();
      return;
    }
    const record: SwitchRecord = {
      from: this.kind,
      to: wanted,
      reason: this.sfuUnreachable ? "the SFU is unreachable" : `${this.participants.length + 1} members`,
      startedAt: performance.now(),
    };
    this.switching = this.switchTo(wanted, record).finally(() => {
      this.switching = null;
    });
    await this.switching;
    if (this.wantedKind !== this.kind) void this.reconcile();
  }

  private async switchTo(kind: MediaKind, record: SwitchRecord): Promise<void> {
    let next: MediaTransport;
    try {
      if (kind === "mesh") {
        const own = this.own!;
        const mesh = await MeshTransport.start(
          this.client,
          {
            userId: own.sender,
            deviceId: own.deviceId,
            sessionId: `${own.memberId}.${own.createdTs()}`,
            identity: own.rtcBackendIdentity,
            roomId: this.room.roomId,
            encryptedSignalling: this.encrypted,
          },
          this.media,
          this.keys,
          () => this.onTransportChange(),
          this.recentSignalling(),
        );
        mesh.setMembers(this.meshMembers());
        next = mesh;
      } else {
        const service = this.sfuServiceUrl();
        if (!service) throw new Error("No call server (SFU) is configured for this homeserver.");
        const creds = await sfuCredentials(this.client, service, this.room.roomId, this.options.sticky, this.memberId);
        next = await SfuTransport.start(creds, this.media, this.keys, () => this.onTransportChange(), {
          subscribeAll: !!this.options.keyless,
        });
        this.replaceSfu = false;
      }
    } catch (e) {
      this.error = e instanceof Error ? e.message : String(e);
      if (kind === "sfu") this.markSfuUnreachable();
      this.changed();
      return;
    }
    if (this.left) {
      await next.close();
      return;
    }
    this.error = this.sfuUnreachable ? SFU_LOST_NOTICE : null;
    const previous = this.transport;
    if (previous instanceof MeshTransport) this.meshEndedAt = performance.now();
    this.old = previous;
    this.transport = next;
    this.kind = kind;
    this.switches.push(record);
    this.changed();
    if (previous) {
      // Make before break: the old transport carries media until the new one has video from
      // every participant (or the settle limit passes).
      const until = performance.now() + SETTLE_LIMIT_MS;
      const told = new Set<string>();
      while (performance.now() < until && !this.left) {
        const members = [...this.participants];
        const stats = await Promise.all(
          members.map(async (p) => {
            const m = next.remotes().get(p.identity);
            return m ? (await receiverStats(m.receivers())).framesDecoded : 0;
          }),
        );
        members.forEach((p, i) => {
          if (stats[i] > 0 && !told.has(p.identity)) {
            told.add(p.identity);
            void this.sendMediaReceived(p, kind);
          }
        });
        if (stats.every((n) => n > 0)) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      this.old = null;
      // Closed in the background: a transport whose server is gone can take seconds to give
      // up, and the call is already on the new one.
      void previous.close().catch(() => {});
    }
    record.doneAt = performance.now();
    this.attachMedia();
    this.changed();
  }

  /** Tell `p` that we receive its media over `kind` (MEDIA_RECEIVED, as the Python switcher
   *  does at each cutover): a Python member keeps its old transport, and so its media to us
   *  on it, until every member has said so or its acknowledgement timeout (3 s) passed. Sent
   *  Olm-encrypted only: the Python side counts it only from a member's verified device. */
  private async sendMediaReceived(p: Participant, kind: MediaKind): Promise<void> {
    if (!this.encrypted) return;
    try {
      await this.client.encryptAndSendToDevice(
        MEDIA_RECEIVED,
        [{ userId: p.userId, deviceId: p.deviceId }],
        { room_id: this.room.roomId, kind },
      );
    } catch {
      // The member falls back to its acknowledgement timeout.
    }
  }

  private onTransportChange(): void {
    if (this.transport?.failure && !this.sfuUnreachable) this.error = this.transport.failure;
    this.attachMedia();
    this.changed();
  }

  /** The SFU carrying our media has been down for SFU_FAIL_AFTER_MS: fall back (policy). */
  private watchSfu(): void {
    const t = this.transport;
    if (this.sfuUnreachable || !(t instanceof SfuTransport) || t.lostSince === null) return;
    if (performance.now() - t.lostSince >= SFU_FAIL_AFTER_MS) this.markSfuUnreachable();
  }

  private markSfuUnreachable(): void {
    if (this.sfuUnreachable || this.left) return;
    this.sfuUnreachable = true;
    this.replaceSfu = this.transport instanceof SfuTransport;
    if (this.transport instanceof SfuTransport) this.transport.abandon();
    this.error = SFU_LOST_NOTICE;
    this.sfuProbeTimer = window.setInterval(() => void this.probeSfu(), SFU_PROBE_MS);
    this.onMemberships();
  }

  private async probeSfu(): Promise<void> {
    const service = this.sfuServiceUrl();
    if (this.probing || this.left || !service) return;
    this.probing = true;
    try {
      await sfuCredentials(this.client, service, this.room.roomId, this.options.sticky, this.memberId);
    } catch {
      return;
    } finally {
      this.probing = false;
    }
    if (!this.sfuUnreachable || this.left) return;
    clearInterval(this.sfuProbeTimer);
    this.sfuUnreachable = false;
    this.error = null;
    this.onMemberships();
  }

  /** Each participant's media: from the current transport, else the one being replaced. */
  private attachMedia(): void {
    const current = this.transport?.remotes() ?? new Map<string, RemoteMedia>();
    const old = this.old?.remotes() ?? new Map<string, RemoteMedia>();
    for (const p of this.participants) {
      const c = current.get(p.identity);
      const o = old.get(p.identity);
      p.media = c?.video || !o ? c : o;
    }
  }

  private async watchFrames(): Promise<void> {
    const now = performance.now();
    const sources = [this.transport, this.old].filter((t): t is MediaTransport => !!t);
    for (const p of this.participants) {
      let clock = this.frameClock.get(p.identity);
      let advanced = false;
      for (const t of sources) {
        const m = t.remotes().get(p.identity);
        for (const r of m?.receivers() ?? []) {
          if (r.track.kind !== "video") continue;
          const n = (await receiverStats([r])).framesDecoded;
          if (!clock) this.frameClock.set(p.identity, (clock = { first: 0, last: 0, maxGapMs: 0, counts: new Map(), gaps: [] }));
          if (n > (clock.counts.get(r) ?? 0)) advanced = true;
          clock.counts.set(r, n);
        }
      }
      if (advanced && clock) {
        if (clock.last > 0) {
          clock.maxGapMs = Math.max(clock.maxGapMs, now - clock.last);
          if (now - clock.last > 150 && clock.gaps.length < 500) clock.gaps.push([now, now - clock.last]);
        } else {
          clock.first = now;
        }
        clock.last = now;
      }
    }
  }

  private async refreshStats(): Promise<void> {
    const now = performance.now();
    for (const p of this.participants) {
      p.keyIndex = this.keys.latestIndex(p.identity);
      if (!p.media) continue;
      const s = await receiverStats(p.media.receivers());
      const prev = this.prevBytes.get(p.identity);
      const kbps = prev && now > prev.at && s.bytes >= prev.bytes ? ((s.bytes - prev.bytes) * 8) / (now - prev.at) : 0;
      this.prevBytes.set(p.identity, { at: now, bytes: s.bytes });
      p.stats = { ...s, kbps };
      p.speaking = !p.media.audioMuted && s.audioLevel > 0.02;
      p.audioLevelMax = Math.max(p.audioLevelMax, s.audioLevel, s.audioRms);
      if (s.framesDecoded > 0) p.e2ee = "decrypting";
      else if (!this.keys.has(p.identity)) p.e2ee = "waiting-for-key";
      else if (s.videoPackets > 60) p.e2ee = "undecryptable";
      else p.e2ee = "waiting-for-media";
    }
    this.changed();
  }

  async setMuted(kind: "audio" | "video", muted: boolean): Promise<void> {
    const tracks = kind === "audio" ? this.media.stream.getAudioTracks() : this.media.stream.getVideoTracks();
    for (const t of tracks) t.enabled = !muted;
    if (kind === "audio") this.media.audioMuted = muted;
    else this.media.videoMuted = muted;
    await this.transport?.localChanged();
    this.changed();
  }

  async setScreenShare(on: boolean): Promise<void> {
    if (on && !this.media.screen) {
      this.media.screen = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
      this.media.screen.getVideoTracks()[0]?.addEventListener("ended", () => void this.setScreenShare(false));
    } else if (!on && this.media.screen) {
      for (const t of this.media.screen.getTracks()) t.stop();
      this.media.screen = undefined;
    }
    await this.transport?.localChanged();
    this.changed();
  }

  async leave(): Promise<void> {
    if (this.left) return;
    this.left = true;
    clearInterval(this.statsTimer);
    clearInterval(this.gapTimer);
    clearInterval(this.sfuProbeTimer);
    this.session.off(MatrixRTCSessionEvent.MembershipsChanged, this.onMemberships);
    this.session.off(MatrixRTCSessionEvent.EncryptionKeyChanged, this.onKey);
    this.client.off(ClientEvent.ReceivedToDeviceMessage, this.onToDevice);
    this.client.off(CryptoEvent.DevicesUpdated, this.onDevicesUpdated);
    await Promise.all([this.transport?.close(), this.old?.close()].map((p) => p?.catch(() => {})));
    this.transport = null;
    await this.session.leaveRoomSession(5000).catch(() => false);
    for (const t of this.media.stream.getTracks()) t.stop();
    for (const t of this.media.screen?.getTracks() ?? []) t.stop();
    this.changed();
  }

  /** Sticky memberships in this room we hold but cannot decrypt (their room key never came:
   *  sent before this device existed, and not sent again), from senders of whom we have no
   *  readable membership: members we do not see. */
  unreadableMemberships(): Array<{ sender: string; eventId: string; reason: string | null }> {
    const readable = new Set(this.session.memberships.map((m) => m.sender));
    return this.room
      .getLiveTimeline()
      .getEvents()
      .filter((e) => e.unstableStickyInfo !== undefined && e.isDecryptionFailure() && !readable.has(e.getSender() ?? ""))
      .map((e) => ({ sender: e.getSender() ?? "", eventId: e.getId() ?? "", reason: e.decryptionFailureReason ?? null }));
  }

  /** For people debugging a call, and for the tests. */
  async snapshot(): Promise<Record<string, unknown>> {
    const parts = await Promise.all(
      this.participants.map(async (p) => ({
        identity: p.identity,
        userId: p.userId,
        deviceId: p.deviceId,
        name: p.name,
        transport: p.media?.transport ?? null,
        state: p.media?.state ?? null,
        hasVideo: !!p.media?.video,
        hasAudio: !!p.media?.audio,
        hasScreen: !!p.media?.screen,
        audioMuted: p.media?.audioMuted ?? null,
        videoMuted: p.media?.videoMuted ?? null,
        keyIndex: p.keyIndex ?? null,
        e2ee: p.e2ee,
        audioLevelMax: p.audioLevelMax,
        maxGapMs: Math.round(this.frameClock.get(p.identity)?.maxGapMs ?? 0),
        firstKeyMs: this.keys.firstAt.has(p.identity) ? this.keys.firstAt.get(p.identity)! - this.joinedWall : null,
        firstFrameMs: this.frameClock.get(p.identity)?.first ? Math.round(this.frameClock.get(p.identity)!.first - this.joinedAt) : null,
        stats: p.media ? await receiverStats(p.media.receivers()) : null,
      })),
    );
    return {
      joined: this.session.isJoined(),
      kind: this.kind,
      sfuUnreachable: this.sfuUnreachable,
      ownIdentity: this.own?.rtcBackendIdentity ?? null,
      ownKeyIndex: this.own ? this.keys.latestIndex(this.own.rtcBackendIdentity) ?? null : null,
      memberships: this.session.memberships.length,
      // Sticky form, encrypted room: our membership sent again for devices that appeared later.
      membershipResends: this.resends,
      unreadableMemberships: this.unreadableMemberships(),
      participants: parts,
      // Per switch: how long it took, and the longest time anyone's video stood still from its
      // start until 3 s after it was done.
      transportReadyMs: this.switches[0]?.doneAt ? Math.round(this.switches[0].doneAt - this.joinedAt) : null,
      // When the homeserver stored our membership (its origin_server_ts), after the click.
      ownMembershipMs: this.own ? this.own.createdTs() - this.joinedWall : null,
      switches: this.switches.map((s) => {
        const end = (s.doneAt ?? performance.now()) + 3000;
        const gaps = [...this.frameClock.values()].flatMap((c) => c.gaps.filter(([at]) => at >= s.startedAt && at - 0 <= end));
        return {
          ...s,
          durationMs: s.doneAt === undefined ? null : Math.round(s.doneAt - s.startedAt),
          gapMs: Math.round(Math.max(0, ...gaps.map(([, g]) => g))),
        };
      }),
      error: this.error,
      meshLog: this.transport instanceof MeshTransport ? this.transport.log.slice(-30) : [],
      cryptorErrors: this.transport instanceof MeshTransport ? this.transport.crypto.errors.slice(-10) : this.transport instanceof SfuTransport ? this.transport.encryptionErrors.slice(-10) : [],
      frameCryptoMode: this.transport instanceof MeshTransport ? this.transport.crypto.mode : null,
    };
  }
}

/** js-sdk 43 writes a sticky m.rtc.member with `transports.published` = its one LiveKit
 *  transport and `can_subscribe` = ["livekit"], with no way to add another. The Python
 *  agent's sticky membership lists the mesh transport in both when it can mesh; this adds it to
 *  the content js-sdk's membership manager of this session builds, so sticky members can mesh
 *  (checkRtcMembershipData accepts any typed transport object and any strings). */
function advertiseMeshWhenSticky(session: MatrixRTCSession): void {
  type Content = { transports?: { published?: unknown[]; can_subscribe?: string[] } } & Record<string, unknown>;
  const manager = (session as unknown as { membershipManager?: { makeMyMembership?: () => Content } }).membershipManager;
  const build = manager?.makeMyMembership?.bind(manager);
  if (!manager || !build) return;
  manager.makeMyMembership = () => {
    const content = build();
    const t = content.transports;
    if (t && Array.isArray(t.published) && Array.isArray(t.can_subscribe)) {
      t.published = [...t.published, { type: MESH_TRANSPORT_TYPE }];
      t.can_subscribe = [...t.can_subscribe, MESH_TRANSPORT_TYPE];
    }
    return content;
  };
}

/** js-sdk's sticky membership manager sends our m.rtc.member through its `clientSendMembership`
 *  (a field): wrap it so that, just before each join/update (not a leave: empty content), the
 *  devices our crypto knows are noted, and handed to `onSent` once the event is sent. Taken
 *  before the send, the set can only miss devices the event's room key went to, never hold one
 *  it did not go to: a device it misses costs one extra send, never a member who cannot read us. */
function noteReadersOnSend(
  session: MatrixRTCSession,
  known: () => Promise<Set<string>>,
  onSent: (readers: Set<string>) => void,
): void {
  type Send = (content: Record<string, unknown>) => Promise<unknown>;
  const manager = (session as unknown as { membershipManager?: { clientSendMembership?: Send } }).membershipManager;
  const send = manager?.clientSendMembership;
  if (!manager || !send) return;
  manager.clientSendMembership = async (content) => {
    const join = Object.keys(content).length > 0;
    const readers = join ? await known().catch(() => new Set<string>()) : null;
    const response = await send(content);
    if (readers) onSent(readers);
    return response;
  };
}

export { EventType };
