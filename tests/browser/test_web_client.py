"""The web call client (web/, built into web/dist by the bootstrap) in Chromium, driven like a
person (login, room list, lobby, join, controls, leave) against a real Synapse whose
``/rtc/transports`` advertises our authorization service in front of a real LiveKit, in one
end-to-end encrypted room with a Python participant (``matrixrtc.calltest.participant``):

* SFU: the browser (livekit-client + its E2EE worker, keys from matrix-js-sdk's
  MatrixRTCSession over Olm) and the Python participant on LiveKit decode each other's video;
* mesh: the browser places the call (MSC2746 over Olm to-device, as the project's mesh engine)
  and both decode each other's frames, encrypted in LiveKit's frame format.

"Decoded" is measured on both sides: the browser's decoder counts frames and the remote tile's
pixels are a real, changing picture; the Python participant counts frames it decrypted and
decoded from the browser's device.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.calltest.runner import ParticipantProcess, participants, provision
from matrixrtc.devstack import AuthService, Chromium, LiveKit, Synapse
from tests.browser.helpers import BROWSER_DIR, run_node, serve_dir

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "web" / "dist"


@dataclass(frozen=True)
class WebStack:
    synapse: Synapse
    sfu_url: str
    client_url: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def web_stack(run_dir: Path, livekit: LiveKit) -> AsyncIterator[WebStack]:
    """Synapse advertising our authorization service (both discovery paths), the service,
    and the built client served on loopback."""
    if not (DIST / "index.html").is_file():
        pytest.fail("web/dist is missing: run `make bootstrap` (npm ci + vite build in web/)")
    extra: dict[str, Any] = {}
    hs = Synapse(run_dir, extra_config=extra, name="web-synapse")
    svc = AuthService(run_dir, livekit, hs, name="web-sfu")
    focus = {"type": "livekit", "livekit_service_url": svc.url}
    # Filled in before Synapse writes its config (at start): the service's port is known now.
    extra["matrix_rtc"] = {"transports": [focus]}
    extra["extra_well_known_client_content"] = {"org.matrix.msc4143.rtc_foci": [focus]}
    async with hs, svc, serve_dir(DIST) as client_url:
        yield WebStack(hs, svc.url, client_url)


async def _browser(
    chromium: Chromium, stack: WebStack, user: str, password: str, room_id: str, **opts: Any
) -> dict[str, Any]:
    options = {
        "base": stack.client_url,
        "homeserver": stack.synapse.base_url,
        "user": user,
        "password": password,
        "roomId": room_id,
        "transport": "auto",
        "dialect": "state",
        "peers": 1,
        "minFrames": 30,
        "holdMs": 3000,
        "timeoutMs": 45000,
        **opts,
    }
    out = await run_node(
        str(BROWSER_DIR / "web_client.mjs"),
        chromium.devtools_url,
        json.dumps(options),
        limit=options["timeoutMs"] / 1000 + 60,
    )
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _frames_from(p: ParticipantProcess, user_id: str) -> tuple[int, str | None]:
    """Video frames the Python participant decoded from ``user_id``'s device, and the carrier."""
    for peer in (p.latest or {}).get("peers", []):
        if peer.get("user_id") == user_id:
            return int(peer.get("frames_decoded") or 0), peer.get("transport")
    return 0, None


def _check_browser_side(result: dict[str, Any], kind: str) -> dict[str, Any]:
    assert result["ok"], {k: v for k, v in result.items() if k != "first"}
    last = result["last"]
    assert last["joined"] is True
    assert last["kind"] == kind, last
    (remote,) = last["participants"]
    # The browser decrypted and decoded the Python participant's video ...
    assert remote["transport"] == kind
    assert remote["e2ee"] == "decrypting", remote
    assert remote["stats"]["framesDecoded"] >= 30, remote
    assert remote["keyIndex"] is not None
    # ... and the remote tile shows a real, moving picture (not black, not a flat fill).
    (a, b) = result["tiles"][remote["identity"]]
    assert a is not None, result["tiles"]
    assert b is not None, result["tiles"]
    assert a["std"] > 8, a
    assert b["std"] > 8, b
    assert a["mean"] != b["mean"], "the remote picture does not change"
    assert "E2EE: decrypting" in result["badges"]
    assert "Key index" in result["statsText"]
    assert result["unnamed"] == [], result["unnamed"]
    assert last["cryptorErrors"] == [] or kind == "sfu", last["cryptorErrors"]
    out: dict[str, Any] = remote
    return out


async def _call(
    chromium: Chromium,
    stack: WebStack,
    *,
    browser_name: str,
    python_transport: str,
    browser_opts: dict[str, Any],
) -> tuple[dict[str, Any], int, str | None]:
    tag = secrets.token_hex(3)
    prov = await provision(
        stack.synapse.base_url, [f"py-{tag}", f"{browser_name}-{tag}"], encrypted=True
    )
    (py_user, py_pw), (web_user, web_pw) = prov.users
    cfg = ParticipantConfig(
        name="py",
        homeserver=prov.base_url,
        user=py_user,
        password=py_pw,
        room_id=prov.room_id,
        duration_s=0,
        transport=python_transport,
        sfu_url=stack.sfu_url if python_transport != "mesh" else None,
    )
    async with participants([cfg], stack.synapse.dir / f"py-{tag}") as (py,):
        await py.wait_ready()
        browser = asyncio.create_task(
            _browser(chromium, stack, web_user, web_pw, prov.room_id, **browser_opts)
        )
        try:
            # While the browser is in the call: the Python side decodes the browser's video.
            await py.wait_until(lambda p: _frames_from(p, web_user)[0] >= 30, 60)
            frames, via = _frames_from(py, web_user)
        except BaseException:
            result = await browser
            print(json.dumps(result, indent=1)[:6000])
            raise
        result = await browser
    print(json.dumps({k: result.get(k) for k in ("marks", "badges", "muteCheck")}))
    print("browser:", json.dumps(result.get("last")), json.dumps(result.get("tiles")))
    return result, frames, via


async def test_sfu_call_with_a_python_participant(chromium: Chromium, web_stack: WebStack) -> None:
    result, frames, via = await _call(
        chromium,
        web_stack,
        browser_name="web",
        python_transport="sfu",
        browser_opts={"transport": "sfu", "toggleMute": True},
    )
    print("python decoded", frames, "via", via)
    _check_browser_side(result, "sfu")
    assert frames >= 30
    assert via == "sfu"
    # Mute and unmute from the call controls.
    assert result["muteCheck"] == {"mutedLabel": "Unmute microphone", "pressedAfter": "false"}


async def test_mesh_call_with_a_python_participant(chromium: Chromium, web_stack: WebStack) -> None:
    # "aweb…" < "py…": the browser places the call (invite), the aiortc participant answers.
    # The client runs the mesh/SFU policy: both advertise mesh, two members -> mesh.
    result, frames, via = await _call(
        chromium,
        web_stack,
        browser_name="aweb",
        python_transport="mesh",
        browser_opts={"transport": "auto", "keyboard": True},
    )
    print("python decoded", frames, "via", via)
    remote = _check_browser_side(result, "mesh")
    assert result["last"]["frameCryptoMode"] == "encoded-streams"  # Chromium
    assert frames >= 30
    assert remote["state"] == "connected"
