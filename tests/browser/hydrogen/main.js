// A Hydrogen (hydrogen-view-sdk, npm) group-call member in Chromium: logs in with a password
// (a new device with Olm keys), joins the room's 2022 MSC3401 call (or creates one), sends the
// fake camera/microphone, and returns per-remote-device WebRTC stats after `stayMs` (then
// leaves: its hangups go out), when the test says leave, or once the remote device
// `untilHangupFrom` is gone. Reports its stats to the test meanwhile (../peer_loop.js).
import { Platform, Client, LoadStatus, FeatureSet, FeatureFlag, LocalMedia, createNavigation } from "hydrogen-view-sdk";
import downloadSandboxPath from "hydrogen-view-sdk/download-sandbox.html?url";
import workerPath from "hydrogen-view-sdk/main.js?url";
import olmWasmPath from "@matrix-org/olm/olm.wasm?url";
import olmJsPath from "@matrix-org/olm/olm.js?url";
import olmLegacyJsPath from "@matrix-org/olm/olm_legacy.js?url";
import { inboundStats, play, sleep, stay } from "../peer_loop.js";

const assetPaths = {
  downloadSandbox: downloadSandboxPath,
  worker: workerPath,
  olm: { wasm: olmWasmPath, legacyBundle: olmLegacyJsPath, wasmBundle: olmJsPath },
  // The SDK's own service worker (lib-build/sw.js, copied next to the page by the test): it
  // keeps the access token for authenticated media, and login fails without it.
  serviceWorker: "sw.js",
};

function render(call) {
  for (const member of call.members.values()) play(member.remoteMedia?.userMedia);
}

async function snapshot(call) {
  const now = {};
  for (const member of call.members.values()) {
    now[`${member.userId}|${member.deviceId}`] = await inboundStats(member.connection?.peerCall?.peerConnection, {
      connected: member.isConnected,
    });
  }
  return now;
}

window.runHydrogen = async (o) => {
  const log = [];
  const platform = new Platform({
    container: document.getElementById("app"),
    assetPaths,
    config: {},
    options: { development: false },
  });
  platform.setNavigation(createNavigation());
  await platform.init();
  const client = new Client(platform, new FeatureSet(FeatureFlag.Calls));
  const login = await client.queryLogin(o.baseUrl).result;
  client.startWithLogin(login.password(o.username, o.password));
  await client.loadStatus.waitFor(
    (s) => s === LoadStatus.Ready || s === LoadStatus.Error || s === LoadStatus.LoginFailed,
  ).promise;
  if (client.loginFailure || client.loadError) {
    throw new Error(`hydrogen: ${client.loginFailure ?? client.loadError?.message}`);
  }
  const session = client.session;
  const handler = session.callHandler;
  if (!handler) throw new Error("hydrogen: no callHandler (calls feature off)");
  const deadline = Date.now() + (o.waitCallMs ?? 0);
  const find = () => Array.from(handler.calls.values()).find((c) => c.roomId === o.roomId && !c.isTerminated);
  let call = find();
  while (!call && Date.now() < deadline) {
    await sleep(100);
    call = find();
  }
  if (!call) call = await handler.createCall(o.roomId, o.video === false ? "m.voice" : "m.video", "hydrogen test", "m.room");
  const stream = await platform.mediaDevices.getMediaTracks(o.audio !== false, o.video !== false);
  await call.join(new LocalMedia().withUserMedia(stream));
  log.push(`joined ${call.id} device ${session.deviceId} session ${handler.sessionId ?? ""}`);
  const { stats, elapsedMs } = await stay(o, {
    render: () => render(call),
    snapshot: () => snapshot(call),
    done: (now, seen) => o.untilHangupFrom && seen.has(o.untilHangupFrom) && !now[o.untilHangupFrom],
  });
  const result = { callId: call.id, deviceId: session.deviceId, stats, elapsedMs, log };
  await call.leave();
  await sleep(1000);
  return result;
};
