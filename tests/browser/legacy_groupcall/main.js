// A matrix-js-sdk legacy GroupCall member (the 2022 MSC3401 full mesh, as Element Call's
// full-mesh era used it) in Chromium: no crypto, plaintext to-device signalling, real WebRTC.
// window.runGroupCall(options) joins the room's call, renders every remote feed, and returns
// per-remote-device WebRTC stats either after `stayMs` (then leaves: our hangup goes out) or
// as soon as the remote device `untilHangupFrom` hung up on us, or when the test says leave.
// Reports its stats to the test meanwhile (../peer_loop.js).
import { createClient, ClientEvent, GroupCallIntent, GroupCallType, CallEvent } from "matrix-js-sdk";
import { inboundStats, play, sleep, stay } from "../peer_loop.js";

function render(groupCall) {
  for (const feed of groupCall.userMediaFeeds) if (!feed.isLocal()) play(feed.stream);
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
  const snapshot = async () => {
    const now = {};
    for (const { userId, deviceId, call } of calls()) {
      now[`${userId}|${deviceId}`] = await inboundStats(call.peerConn, {
        state: call.state,
        hangupReason: call.hangupReason ?? null,
      });
    }
    return now;
  };
  const { stats, elapsedMs } = await stay(o, {
    render: () => render(groupCall),
    snapshot,
    done: () => o.untilHangupFrom && hangups.some((h) => h.deviceId === o.untilHangupFrom),
  });
  const result = { groupCallId: groupCall.groupCallId, sessionId: client.getSessionId(), stats, hangups, elapsedMs, log };
  groupCall.leave();
  await sleep(1000); // the hangups and the member-state update go out
  client.stopClient();
  return result;
};
