// A matrix-js-sdk MatrixRTCSession member, driven over stdin/stdout (issue 12 interop tests).
//
// Config: one JSON object in the MEMBER_CONFIG environment variable:
//   {"baseUrl", "user", "password", "roomId", "dialect": "state"|"sticky",
//    "livekitServiceUrl", "delayedLeaveMs"?, "notificationType"?: "ring"|"notification",
//    "openSlot"?: bool, "encryption"?: bool}
// Output: one JSON object per line on stdout:
//   {"event": "ready", "user_id", "device_id", "member_id"}
//   {"event": "memberships", "members": [{user_id, device_id, member_id, identity, kind,
//                                         transport, created_ts}]}
//   {"event": "key", "user_id", "device_id", "member_id", "identity", "index", "key"}  (base64)
//   {"event": "notification", "event_id", "sender", "valid", "error", "content"}
//   {"event": "sent_notification", "event_id", "content"}
//   {"event": "left", "ok"}
// With "join": false in the config it logs in and syncs, and joins on {"cmd": "join"}.
// Commands: one JSON object per line on stdin: {"cmd": "join"}, {"cmd": "leave"}, {"cmd": "decline",
//   "event_id"}, {"cmd": "has_declined", "user_id", "event_id"}, {"cmd": "track", "user_ids"},
//   {"cmd": "close_slot"}, {"cmd": "quit"}.
// Everything the SDK logs goes to stderr. The crypto is the SDK's Rust crypto (WASM), kept
// in memory: a fresh device per run.
// matrix-js-sdk 43 declares Node >= 22; this machine has Node 20, which lacks exactly one API
// the SDK uses (Promise.withResolvers, Node 22 / ES2024). Provide it before the SDK loads.
import "./node20.mjs";
import readline from "node:readline";
import { randomUUID } from "node:crypto";
import * as sdk from "matrix-js-sdk";
import * as RustSdkCryptoJs from "@matrix-org/matrix-sdk-crypto-wasm";
import { logger as sdkLogger } from "matrix-js-sdk/lib/logger.js";
import { MatrixRTCSessionEvent } from "matrix-js-sdk/lib/matrixrtc/MatrixRTCSession.js";
import { parseCallNotificationContent } from "matrix-js-sdk/lib/matrixrtc/types.js";

const cfg = JSON.parse(process.env.MEMBER_CONFIG);
const stdout = process.stdout;
const out = (obj) => stdout.write(JSON.stringify(obj) + "\n");
// The SDK logs through loglevel to the console: keep stdout for our protocol.
for (const name of ["log", "info", "debug", "warn", "error", "trace"]) {
  console[name] = (...args) => process.stderr.write(args.map(String).join(" ") + "\n");
}
sdkLogger.setLevel(process.env.MEMBER_LOG_LEVEL ?? "info");

function b64(bytes) {
  return Buffer.from(bytes).toString("base64");
}

async function login() {
  const anon = sdk.createClient({ baseUrl: cfg.baseUrl });
  const res = await anon.loginRequest({
    type: "m.login.password",
    identifier: { type: "m.id.user", user: cfg.user },
    password: cfg.password,
    initial_device_display_name: "js-sdk interop member",
  });
  return sdk.createClient({
    baseUrl: cfg.baseUrl,
    userId: res.user_id,
    deviceId: res.device_id,
    accessToken: res.access_token,
  });
}

async function waitForSync(client) {
  await new Promise((resolve, reject) => {
    client.on(sdk.ClientEvent.Sync, (state) => {
      if (state === "PREPARED") resolve();
      if (state === "ERROR") reject(new Error("sync error"));
    });
  });
}

async function waitForRoom(client, roomId) {
  for (let i = 0; i < 200; i++) {
    const room = client.getRoom(roomId);
    if (room && room.getMyMembership() === "join") return room;
    if (room && room.getMyMembership() === "invite") await client.joinRoom(roomId);
    else if (!room) await client.joinRoom(roomId).catch(() => {});
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`room ${roomId} not joined`);
}

async function describe(m) {
  let transport = null;
  try {
    transport = m.getTransport(session.getOldestMembership()) ?? null;
  } catch {
    transport = null;
  }
  return {
    user_id: m.userId,
    device_id: m.deviceId,
    member_id: m.memberId,
    identity: m.rtcBackendIdentity,
    kind: m.membershipData.kind,
    transport,
    created_ts: m.createdTs(),
    event_id: m.eventId,
  };
}

const client = await login();
await client.initRustCrypto({ useIndexedDB: false });
const synced = waitForSync(client);
await client.startClient({ initialSyncLimit: 20 });
await synced;
const room = await waitForRoom(client, cfg.roomId);
const session = client.matrixRTC.getRoomSession(room);
const memberId = cfg.dialect === "sticky" ? randomUUID() : `${client.getUserId()}:${client.getDeviceId()}`;

session.on(MatrixRTCSessionEvent.MembershipsChanged, async (_old, now) => {
  out({ event: "memberships", members: await Promise.all(now.map(describe)) });
});

// The Rust crypto tracks the devices of encrypted rooms' members only. In a plain room its
// to-device media keys would have no device to go to, and it could not check the signing key
// of the Olm messages it receives (MissingSigningKey). Track the given users explicitly, as
// an app sending media keys in a plain room has to, and wait until their devices are known.
async function track(userIds) {
  const crypto = client.getCrypto();
  await crypto.getOlmMachineOrThrow().updateTrackedUsers(userIds.map((u) => new RustSdkCryptoJs.UserId(u)));
  // Send the resulting /keys/query now rather than after the next sync.
  await crypto.outgoingRequestsManager.doProcessOutgoingRequests();
  for (let i = 0; i < 300; i++) {
    const known = await crypto.getUserDeviceInfo(userIds, false);
    if (userIds.every((u) => (known.get(u)?.size ?? 0) > 0)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`devices of ${userIds} never became known`);
}
session.on(MatrixRTCSessionEvent.EncryptionKeyChanged, (key, index, membership, identity) => {
  out({
    event: "key",
    user_id: membership.userId,
    device_id: membership.deviceId,
    member_id: membership.memberId,
    identity,
    index,
    key: b64(key),
  });
});
session.on(MatrixRTCSessionEvent.DidSendCallNotification, (n) => {
  out({ event: "sent_notification", event_id: n.event_id, content: n });
});

// Notifications addressed to us, judged by js-sdk's own receiving rules.
async function judgeNotification(ev) {
  if (ev.getRoomId() !== cfg.roomId || ev.getSender() === client.getUserId()) return;
  // In an encrypted room the timeline hands the event over still encrypted: type after decrypting.
  await client.decryptEventIfNeeded(ev);
  if (ev.getType() !== "org.matrix.msc4075.rtc.notification") return;
  // The sync files sticky events after firing the timeline: judge once the store has it.
  await new Promise((r) => setTimeout(r, 300));
  try {
    const content = await parseCallNotificationContent(ev, { room, userId: client.getUserId() });
    out({ event: "notification", event_id: ev.getId(), sender: ev.getSender(), valid: true,
          error: null, content });
  } catch (e) {
    out({ event: "notification", event_id: ev.getId(), sender: ev.getSender(), valid: false,
          error: String(e?.message ?? e), content: ev.getContent() });
  }
}
client.on(sdk.RoomEvent.Timeline, (ev) => void judgeNotification(ev));

if (cfg.openSlot) {
  await session.ensureRtcSlotOpen(
    cfg.encryption ? { encryption: { type: "org.matrix.msc4143.per_member" } } : {},
  );
}

function join() {
  session.joinRTCSession(
    { userId: client.getUserId(), deviceId: client.getDeviceId(), memberId },
    [],
    multiSfuFocus,
    joinConfig,
  );
}

const transport = { type: "livekit", livekit_service_url: cfg.livekitServiceUrl };
const joinConfig = {
  unstableSendStickyEvents: cfg.dialect === "sticky",
  manageMediaKeys: true,
  callIntent: "video",
  ...(cfg.delayedLeaveMs ? { delayedLeaveEventDelayMs: cfg.delayedLeaveMs,
                             delayedLeaveEventRestartMs: Math.floor(cfg.delayedLeaveMs / 2) } : {}),
  ...(cfg.notificationType ? { notificationType: cfg.notificationType } : {}),
  ...(cfg.keyRotationGracePeriodMs !== undefined
    ? { keyRotationGracePeriodMs: cfg.keyRotationGracePeriodMs } : {}),
};
// Element Call in compatibility mode: the room id as the alias of its multi-SFU focus.
const multiSfuFocus = cfg.dialect === "sticky" ? transport : { ...transport, livekit_alias: cfg.roomId };
if (cfg.join !== false) join();
out({ event: "ready", user_id: client.getUserId(), device_id: client.getDeviceId(), member_id: memberId });

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  const msg = JSON.parse(line);
  if (msg.cmd === "track") {
    await track(msg.user_ids);
    out({ event: "tracked" });
  } else if (msg.cmd === "join") {
    join();
    out({ event: "join_started" });
  } else if (msg.cmd === "leave") {
    const ok = await session.leaveRoomSession(5000);
    out({ event: "left", ok });
  } else if (msg.cmd === "has_declined") {
    // js-sdk's own lookup (types.js hasDeclined): the sticky map keyed by the notification.
    const ev = room._unstable_getKeyedStickyEvent(msg.user_id, "org.matrix.msc4310.rtc.decline", msg.event_id);
    out({ event: "has_declined", value: ev !== undefined, content: ev?.getContent() ?? null });
  } else if (msg.cmd === "decline") {
    const res = await client.sendRtcDecline(cfg.roomId, msg.event_id);
    out({ event: "declined", event_id: res.event_id });
  } else if (msg.cmd === "close_slot") {
    // What a js-sdk caller does to end the call for everyone (needs the power level).
    await session.ensureRtcSlotClosed();
    out({ event: "slot_closed" });
  } else if (msg.cmd === "quit") {
    await session.leaveRoomSession(5000).catch(() => {});
    client.stopClient();
    process.exit(0);
  }
});
