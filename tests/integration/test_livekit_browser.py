"""Interop with Element Call's E2EE stack: Chromium running livekit-client (npm, its own E2EE
worker) with a key provider set up as Element Call's ``MatrixKeyProvider`` (per-participant
keys imported as raw HKDF material, ratchet window 10, ring 256), and a Python participant on
our LiveKit transport, in one LiveKit room through our authorization service. Each decrypts
and decodes the other's video. Keys use indices other than 0, so the Python sender must have
followed its key index.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest_asyncio
from aiohttp import web

from matrixrtc.devstack import Chromium, LiveKit, Synapse, UserCreds
from matrixrtc.livekit import Endpoint, request_credentials
from matrixrtc.model.livekit_ids import livekit_room_alias
from tests.browser.helpers import BROWSER_DIR, run_node
from tests.integration.test_livekit_transport import (
    Service,
    conn,
    make_participant,
    now_ms,
    openid_source,
    service,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
BROWSER_SECONDS = 8.0

# Element Call's MatrixKeyProvider, written out for the test page.
PAGE = """<!doctype html>
<html><body><video id="v" autoplay muted playsinline></video>
<script type="module">
import { Room, RoomEvent, Track, BaseKeyProvider } from
  "/node_modules/livekit-client/dist/livekit-client.esm.mjs";

class MatrixLikeKeyProvider extends BaseKeyProvider {
  constructor() { super({ ratchetWindowSize: 10, keyringSize: 256 }); }
  async setRaw(identity, b64, index) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const material = await crypto.subtle.importKey(
      "raw", bytes, "HKDF", false, ["deriveBits", "deriveKey"]);
    this.onSetEncryptionKey(material, identity, index);
  }
}

window.run = async (arg) => {
  const errors = [];
  const keyProvider = new MatrixLikeKeyProvider();
  const worker = new Worker(
    new URL("/node_modules/livekit-client/dist/livekit-client.e2ee.worker.mjs", location),
    { type: "module" });
  const room = new Room({ encryption: { keyProvider, worker } });
  room.on(RoomEvent.EncryptionError, (e) => errors.push(String(e && e.message || e)));
  let videoTrack = null;
  room.on(RoomEvent.TrackSubscribed, (track, pub, participant) => {
    if (track.kind === Track.Kind.Video && participant.identity === arg.remoteIdentity) {
      videoTrack = track;
      track.attach(document.getElementById("v"));
    }
  });
  for (const [identity, b64, index] of arg.keys) await keyProvider.setRaw(identity, b64, index);
  await room.connect(arg.url, arg.token);
  await room.setE2EEEnabled(true);
  await room.localParticipant.enableCameraAndMicrophone();
  const deadline = performance.now() + arg.ms;
  while (performance.now() < deadline) await new Promise((r) => setTimeout(r, 200));
  let framesDecoded = 0;
  if (videoTrack) {
    const stats = await videoTrack.receiver.getStats();
    stats.forEach((s) => { if (s.type === "inbound-rtp") framesDecoded += s.framesDecoded || 0; });
  }
  const result = {
    identity: room.localParticipant.identity,
    e2ee: room.isE2EEEnabled,
    subscribed: videoTrack !== null,
    framesDecoded,
    errors,
  };
  await room.disconnect();
  return result;
};
</script></body></html>
"""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sfu(synapse: Synapse, livekit: LiveKit, run_dir: Path) -> AsyncIterator[Service]:
    s = service(run_dir, "lk-sfu-browser", livekit, synapse, synapse.server_name)
    try:
        await s.start()
        yield s
    finally:
        await s.stop()


async def serve_page() -> tuple[web.AppRunner, str]:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/page.html", page)
    app.router.add_static("/node_modules/livekit-client/", REPO / "node_modules/livekit-client")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_livekit_client_in_chromium_and_python_decrypt_each_other(
    synapse: Synapse,
    livekit: LiveKit,
    chromium: Chromium,
    sfu: Service,
    user_factory: Callable[..., Awaitable[UserCreds]],
) -> None:
    alice, bob = await user_factory("alice"), await user_factory("bob")
    room_id = await synapse.create_call_room(alice, invite=[bob])
    t0 = now_ms()
    a = make_participant(synapse, alice, room_id, sfu.url, sticky=False, created_ts=t0)
    py_key, py_index = os.urandom(16), 5
    br_key, br_index = os.urandom(16), 7
    async with aiohttp.ClientSession() as http:
        creds = await request_credentials(
            http,
            sfu.url,
            room_id=room_id,
            user_id=bob.user_id,
            device_id=bob.device_id,
            member_id="browser-member",
            openid=await openid_source(synapse, bob)(),
            endpoint=Endpoint.GET_TOKEN,
        )
    assert creds.room == livekit_room_alias(room_id)
    a.transport.use_own_key(py_index, py_key)
    a.transport.set_remote_key(creds.identity, br_index, br_key)
    runner, base = await serve_page()
    try:
        await a.transport.update([a.membership], a.membership)
        ca = conn(a)
        arg = {
            "url": creds.url,
            "token": creds.jwt,
            "remoteIdentity": a.identity,
            "ms": int(BROWSER_SECONDS * 1000),
            "keys": [
                [a.identity, base64.b64encode(py_key).decode(), py_index],
                [creds.identity, base64.b64encode(br_key).decode(), br_index],
            ],
        }
        browser = asyncio.get_running_loop().create_task(
            run_node(
                str(BROWSER_DIR / "eval_page.mjs"),
                chromium.devtools_url,
                f"{base}/page.html",
                "run",
                json.dumps(arg),
                limit=60,
            )
        )
        try:
            await wait_until(
                lambda: creds.identity in ca.stats and ca.stats[creds.identity].video_frames >= 30,
                30,
                "Python to decode 30 frames from the browser",
            )
            first = ca.stats[creds.identity].first_video_at
            assert first is not None
            out = await browser
        finally:
            if not browser.done():
                browser.cancel()
                await asyncio.gather(browser, return_exceptions=True)
        r = json.loads(out.strip().splitlines()[-1])
        print("browser:", r["result"], r["console"][-5:])
        result = r["result"]
        assert result["identity"] == creds.identity
        assert result["e2ee"] is True
        assert result["subscribed"] is True
        # The browser decrypted and decoded the Python participant's VP8 (index 5 on the wire).
        assert result["framesDecoded"] >= 30, result
        assert ca.own_key_indices == [py_index, py_index]
        # And Python decoded the browser's (index 7), without a failing state since.
        stats = ca.stats[creds.identity]
        assert stats.failures_after(first) == [], stats.e2ee_events
        assert time.monotonic() - first > 1.0
    finally:
        await a.transport.aclose()
        await runner.cleanup()
