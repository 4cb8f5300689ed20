"""Calls with Hydrogen (``hydrogen-view-sdk`` from npm, pinned in package.json) in headless
Chromium: its group calls are the 2022 MSC3401 full mesh, signalling only Olm-encrypted and
verified to-device messages. The homeserver is configured as ``stack up`` configures it:
``/voip/turnServer`` hands out the devstack coturn's credentials (on ``{}`` Hydrogen refuses
to call). Both call directions, media decoded on both sides, a video-only call, hangups both
ways."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from matrixrtc.devstack import Chromium, Synapse
from matrixrtc.devstack.coturn import Coturn
from matrixrtc.devstack.synapse import UserCreds
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.engine import MeshConfig, MeshEngine
from matrixrtc.mesh.matrix_link import MatrixMesh
from matrixrtc.session.mesh_signalling import DeviceRef
from tests.browser.helpers import BROWSER_DIR, run_node, serve_dir
from tests.mesh_members import mesh_member

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
PAGE = BROWSER_DIR / "hydrogen"
CONFIG = MeshConfig(host_addresses=("127.0.0.1",), remote_networks=("127.0.0.0/8",))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def turn_synapse(run_dir: Path, coturn: Coturn) -> AsyncIterator[Synapse]:
    """A Synapse like ``stack up``'s: TURN credentials from the devstack coturn."""
    async with Synapse(
        run_dir, extra_config=coturn.synapse_config(), name="synapse-hydrogen"
    ) as hs:
        yield hs


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def page_dist(run_dir: Path) -> AsyncIterator[Path]:
    """The page bundled with the pinned hydrogen-view-sdk by web/'s pinned vite."""
    out = run_dir / "hydrogen-dist"
    vite = REPO / "web" / "node_modules" / ".bin" / "vite"
    if not vite.exists() or not (REPO / "node_modules" / "hydrogen-view-sdk").is_dir():
        pytest.fail("node_modules missing: run make bootstrap")
    proc = await asyncio.create_subprocess_exec(
        str(vite), "build", str(PAGE), "--config", str(PAGE / "vite.config.mjs"),
        "--outDir", str(out),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log, _ = await proc.communicate()
    assert proc.returncode == 0, log.decode()[-2000:]
    shutil.copy(REPO / "node_modules" / "hydrogen-view-sdk" / "lib-build" / "sw.js", out / "sw.js")
    yield out


async def register(hs: Synapse, prefix: str) -> UserCreds:
    return await hs.register(f"{prefix}-{secrets.token_hex(3)}")


def decoded(engine: MeshEngine | None, user_id: str, kind: str) -> int:
    """Frames decoded from the (one) device of ``user_id`` (Hydrogen logs in anew: its device
    id is known only from the call)."""
    if engine is None:
        return 0
    return sum(
        link.stats[kind].frames_decoded
        for link in engine.links.values()
        if link.peer.user_id == user_id and kind in link.stats
    )


def hydrogen_device(mesh: MatrixMesh, user_id: str) -> DeviceRef | None:
    return next((ref for ref in mesh.members if ref.user_id == user_id), None)


async def run_page(chromium: Chromium, url: str, options: dict[str, Any]) -> dict[str, Any]:
    out = await run_node(
        "eval_page.mjs", chromium.devtools_url, url, "runHydrogen", json.dumps(options), limit=90
    )
    line = json.loads(out.strip().splitlines()[-1])
    for text in line["console"]:
        if any(w in text.lower() for w in ("call", "error", "warn")):
            print("page:", text[:400])
    result: dict[str, Any] = line["result"]
    return result


async def poll_until(
    task: asyncio.Task[Any], predicate: Callable[[], bool], within: float, what: str
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if task.done():
            task.result()
            raise AssertionError(f"the page finished before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def options(hs: Synapse, creds: UserCreds, room: str, **extra: Any) -> dict[str, Any]:
    return {
        "baseUrl": hs.base_url,
        "username": creds.user_id,
        "password": creds.password,
        "roomId": room,
        "waitCallMs": 15_000,
        "limitMs": 45_000,
        **extra,
    }


async def test_we_call_hydrogen_media_both_ways_and_its_hangup_arrives(
    turn_synapse: Synapse, chromium: Chromium, page_dist: Path
) -> None:
    hs = turn_synapse
    py, hy = await register(hs, "hya-py"), await register(hs, "hyz-hydrogen")  # we call
    room = await hs.create_call_room(py, invite=[hy])
    media = [SyntheticVideoTrack(320, 240, 15), ToneAudioTrack()]
    async with (
        Homeserver(hs.base_url, Login(py.user_id, password=py.password)) as client,
        mesh_member(client, room, sources=media, config=CONFIG) as call,
        serve_dir(page_dist) as base,
    ):
        page = asyncio.create_task(
            run_page(chromium, base + "/index.html", options(hs, hy, room, stayMs=12_000))
        )
        await poll_until(
            page,
            lambda: all(decoded(call.engine, hy.user_id, k) > 20 for k in ("video", "audio")),
            40,
            "Hydrogen's audio and video decoded here",
        )
        peer = hydrogen_device(call, hy.user_id)
        assert peer is not None
        result = await page
        assert result["callId"] == call.conf_id
        ours = result["stats"][f"{py.user_id}|{client.device_id}"]
        assert ours["video"] > 20, ours  # decoded in Chromium by Hydrogen's peer connection
        assert ours["audio"] > 0, ours
        # Hydrogen accepts only Olm: everything we sent it went that way.
        assert call.sent[(peer.device_id, "olm")] > 0
        assert call.sent[(peer.device_id, "plaintext")] == 0
        # Its leave: the hangup reaches us and the link closes.
        await poll_until(
            asyncio.ensure_future(asyncio.sleep(15)),
            lambda: call.engine is not None and call.engine.link_for(peer) is None,
            15,
            "Hydrogen's hangup / leave",
        )
        assert call.dropped_signalling == 0


# In make test-media, not make test: in a loaded CI check Hydrogen's side never reported its
# connection to us connected within the 2 s after we decoded its video (passes alone).
@pytest.mark.media_matrix
async def test_hydrogen_calls_us_video_only_and_our_hangup_arrives(
    turn_synapse: Synapse, chromium: Chromium, page_dist: Path
) -> None:
    hs = turn_synapse
    hy, py = await register(hs, "hya-hydrogen"), await register(hs, "hyz-py")  # Hydrogen calls
    room = await hs.create_call_room(py, invite=[hy])
    async with (
        Homeserver(hs.base_url, Login(py.user_id, password=py.password)) as client,
        serve_dir(page_dist) as base,
    ):
        me = f"{py.user_id}|{client.device_id}"
        async with mesh_member(
            client, room, sources=[SyntheticVideoTrack(320, 240, 15)], config=CONFIG
        ) as call:
            opts = options(hs, hy, room, audio=False, untilHangupFrom=me)
            page = asyncio.create_task(run_page(chromium, base + "/index.html", opts))
            await poll_until(
                page,
                lambda: decoded(call.engine, hy.user_id, "video") > 20,
                40,
                "Hydrogen's video decoded here",
            )
            assert decoded(call.engine, hy.user_id, "audio") == 0  # a video-only call
            await asyncio.sleep(2.0)  # Hydrogen decodes our video meanwhile
        result = await page  # we left: Hydrogen saw us go
        assert result["elapsedMs"] < 40_000, result
        ours = result["stats"][me]
        assert ours["video"] > 10, ours
        assert ours["audioPackets"] == 0, ours
