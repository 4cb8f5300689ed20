"""A browser joins an aiortc participant's mesh call (web/mesh/mesh-peer.mjs in Chromium):
plaintext to-device signalling with plain ``fetch`` against Synapse, frame E2EE in LiveKit's
format (web/e2ee/frame-e2ee.mjs), keys in clear in an unencrypted room with plaintext keys
explicitly enabled on the Python side. Both decode each other; a browser that ignores the
keys it gets receives the packets and decodes nothing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.calltest.runner import ParticipantProcess, participants, provision
from matrixrtc.devstack import Chromium, Synapse
from matrixrtc.model import FullMeshTransport, SessionMembershipData, state_key_for
from tests.browser.helpers import BROWSER_DIR, run_node, serve_dir

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CALL_MEMBER = "org.matrix.msc3401.call.member"
DURATION_MS = 9000
PAGE_START_S = 30  # the pages' start and end around their DURATION_MS (run_node's margin)


async def _browser_device(base: str, user: str, password: str) -> dict[str, Any]:
    """A fresh device of ``user`` with its call membership (full-mesh transport) published."""
    async with aiohttp.ClientSession() as http:
        login = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        }
        async with http.post(base + "/_matrix/client/v3/login", json=login) as resp:
            assert resp.status == 200
            creds = await resp.json()
        created_ts = int(time.time() * 1000)
        device = str(creds["device_id"])
        content = SessionMembershipData.for_join(
            user_id=user, device_id=device, transports=[FullMeshTransport()], created_ts=created_ts
        ).to_json()
        return {
            "user_id": user,
            "device_id": device,
            "token": str(creds["access_token"]),
            "membership": content,
            "member_id": f"{user}:{device}",
            "session_id": f"{user}:{device}.{created_ts}",
        }


async def _publish(base: str, room_id: str, dev: dict[str, Any], content: Any) -> None:
    key = state_key_for(dev["user_id"], dev["device_id"])
    path = (
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/"
        f"{quote(CALL_MEMBER, safe='')}/{quote(key, safe='')}"
    )
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {dev['token']}"}
        async with http.put(base + path, json=content, headers=headers) as resp:
            assert resp.status == 200, await resp.text()


async def _run_page(
    chromium: Chromium, page_base: str, hs: str, room_id: str, dev: dict[str, Any], *, keys: bool
) -> dict[str, Any]:
    options = {
        "homeserver": hs,
        "accessToken": dev["token"],
        "userId": dev["user_id"],
        "deviceId": dev["device_id"],
        "memberId": dev["member_id"],
        "sessionId": dev["session_id"],
        "roomId": room_id,
        "key": base64.b64encode(os.urandom(16)).decode(),
        "keyIndex": 0,
        "installRemoteKeys": keys,
        "durationMs": DURATION_MS,
    }
    out = await run_node(
        str(BROWSER_DIR / "eval_page.mjs"),
        chromium.devtools_url,
        f"{page_base}/web/mesh/mesh-peer.html",
        "runMeshPeer",
        json.dumps(options),
        limit=DURATION_MS / 1000 + 30,
    )
    line = json.loads(out.strip().splitlines()[-1])
    result: dict[str, Any] = line["result"]
    result["console"] = line["console"]
    return result


def _python_peer(p: ParticipantProcess, dev: dict[str, Any]) -> dict[str, Any] | None:
    if p.latest is None:
        return None
    wanted = f"{dev['user_id']}|{dev['device_id']}"
    return next((x for x in p.latest["peers"] if x["id"] == wanted), None)


async def test_browser_and_aiortc_decode_each_others_encrypted_media(
    synapse: Synapse, chromium: Chromium, run_dir: Path
) -> None:
    tag = secrets.token_hex(3)
    # "mesh…" < "web…": the aiortc participant calls both browsers (the page only answers).
    prov = await provision(
        synapse.base_url, [f"mesh-{tag}", f"web1-{tag}", f"web2-{tag}"], encrypted=False
    )
    (user, pw), web1, web2 = prov.users
    keyed = await _browser_device(prov.base_url, *web1)
    keyless = await _browser_device(prov.base_url, *web2)
    cfg = ParticipantConfig(
        name="py",
        homeserver=prov.base_url,
        user=user,
        password=pw,
        room_id=prov.room_id,
        duration_s=0,
        plaintext_keys=True,
    )
    async with (
        participants([cfg], run_dir / "mesh-browser") as (py,),
        serve_dir(REPO) as page_base,
    ):
        await py.wait_ready()
        for dev in (keyed, keyless):
            await _publish(prov.base_url, prov.room_id, dev, dev["membership"])
        # What the aiortc side decoded of the keyed browser, read while that browser is in the
        # call: its report once 30 frames are in. Read after the pages have left, the latest
        # report may already describe what followed (the closed call, or a new one).
        decoded_30: list[dict[str, Any]] = []

        def keyed_decoded_30(p: ParticipantProcess) -> bool:
            peer = _python_peer(p, keyed)
            if peer is not None and peer["frames_decoded"] >= 30:
                decoded_30.append(peer)
            return bool(decoded_30)

        watch = asyncio.create_task(
            py.wait_until(keyed_decoded_30, DURATION_MS / 1000 + PAGE_START_S)
        )
        try:
            with_key, without_key = await asyncio.gather(
                _run_page(chromium, page_base, prov.base_url, prov.room_id, keyed, keys=True),
                _run_page(chromium, page_base, prov.base_url, prov.room_id, keyless, keys=False),
            )
            # A report comes every second: the one counting the last frames may still be due.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(watch), 3)
            from_keyed = decoded_30[0] if decoded_30 else None
            last_seen = _python_peer(py, keyed)
        finally:
            watch.cancel()
            for dev in (keyed, keyless):
                await _publish(prov.base_url, prov.room_id, dev, {})
    print({k: v for k, v in with_key.items() if k != "console"}, with_key["console"][:5])
    print({k: v for k, v in without_key.items() if k != "console"})
    print("python side:", from_keyed, "last seen:", last_seen)
    py_id = f"{py.device[0]}|{py.device[1]}" if py.device else ""
    # The browser with the key decodes the aiortc participant's encrypted video ...
    seen = with_key["peers"][py_id]
    assert with_key["keysReceived"] >= 1
    assert seen["framesDecoded"] >= 30, seen
    # ... and the aiortc participant decodes the browser's (frames encrypted by livekit's worker).
    assert from_keyed is not None, ("the aiortc side never decoded 30 frames", last_seen)
    assert from_keyed["frames_decoded"] >= 30, from_keyed
    # The browser without the key gets the packets and decodes nothing.
    blind = without_key["peers"][py_id]
    assert without_key["keysReceived"] == 0
    assert blind["videoPackets"] > 100, blind
    assert blind["framesDecoded"] == 0, blind
