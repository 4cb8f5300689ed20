// A matrix-js-sdk legacy GroupCall member (the 2022 MSC3401 full mesh, as Element Call's
// full-mesh era used it) in Chromium: no crypto, plaintext to-device signalling, real WebRTC.
// window.runGroupCall(options) joins the room's call, renders every remote feed, and returns
// per-remote-device WebRTC stats either after `stayMs` (then leaves: our hangup goes out) or
// as soon as the remote device `untilHangupFrom` hung up on us.
import { createClient, ClientEvent, GroupCallIntent, GroupCallType, CallEvent } from "matrix-js-sdk";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function callStats(call) {
  const out = { state: call.state, hangupReason: call.hangupReason ?? null, video: 0, audio: 0, audioPackets: 0 };
  const pc = call.peerConn;
  if (!pc) return out;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type !== "inbound-rtp") return;
    if (s.kind === "video") out.video += s.framesDecoded ?? 0;
    if (s.kind === "audio") {
      out.audio += s.totalSamplesReceived ?? 0;
      out.audioPackets += s.packetsReceived ?? 0;
    }
  });
  return out;
}

function render(groupCall) {
  const box = document.getElementById("media");
  for (const feed of groupCall.userMediaFeeds) {
    if (feed.isLocal() || document.getElementById(feed.stream.id)) continue;
    const el = document.createElement("video");
    el.id = feed.stream.id;
    el.autoplay = true;
    el.muted = false;
    el.srcObject = feed.stream;
    box.appendChild(el);
    el.play().catch(() => {});
  }
}

window.runGroupCall = async (o) => {
  const log = [];
  const client = createClient({
    baseUrl: o.baseUrl,
    userId: o.userId,
    accessToken: o.accessToken,
    deviceId: o.deviceId,
    useLivekitForGroupCalls: false,
    // Its Olm path for group calls throws "Unimplemented" since v37 (legacy crypto removed):
    // plaintext to-device is all current js-sdk can send.
    useE2eForGroupCall: false,
  });
  const prepared = new Promise((resolve) =>
    client.on(ClientEvent.Sync, (state) => state === "PREPARED" && resolve()),
  );
  await client.startClient({ initialSyncLimit: 1 });
  await prepared;
  await client.waitUntilRoomReadyForGroupCalls(o.roomId);
  let groupCall = client.getGroupCallForRoom(o.roomId);
  if (!groupCall) {
    groupCall = await client.createGroupCall(o.roomId, GroupCallType.Video, false, GroupCallIntent.Room);
  }
  const hangups = [];
  const watched = new Set();
  const calls = () => {
    const out = [];
    for (const [userId, devices] of groupCall.calls) {
      for (const [deviceId, call] of devices) {
        out.push({ userId, deviceId, call });
        if (!watched.has(call)) {
          watched.add(call);
          call.on(CallEvent.Hangup, () => hangups.push({ userId, deviceId, reason: call.hangupReason }));
        }
      }
    }
    return out;
  };
  await groupCall.enter();
  log.push(`entered ${groupCall.groupCallId} session ${client.getSessionId()}`);
  const started = Date.now();
  let last = {};
  while (Date.now() - started < o.limitMs) {
    render(groupCall);
    const now = {};
    for (const { userId, deviceId, call } of calls()) {
      now[`${userId}|${deviceId}`] = await callStats(call);
    }
    if (Object.keys(now).length) last = now;
    if (o.untilHangupFrom && hangups.some((h) => h.deviceId === o.untilHangupFrom)) break;
    if (o.stayMs && Date.now() - started >= o.stayMs) break;
    await sleep(250);
  }
  const result = {
    groupCallId: groupCall.groupCallId,
    sessionId: client.getSessionId(),
    stats: last,
    hangups,
    elapsedMs: Date.now() - started,
    log,
  };
  groupCall.leave();
  await sleep(1000); // the hangups and the member-state update go out
  client.stopClient();
  return result;
};
