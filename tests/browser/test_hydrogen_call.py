"""Calls with Hydrogen (``hydrogen-view-sdk`` from npm, pinned in package.json) in headless
Chromium: its group calls are the 2022 MSC3401 full mesh, signalling only Olm-encrypted and
verified to-device messages. The homeserver is configured as ``stack up`` configures it:
``/voip/turnServer`` hands out the devstack coturn's credentials (on ``{}`` Hydrogen refuses
to call). Both call directions, media decoded on both sides, a video-only call, hangups both
ways, a three-party mesh of two Hydrogens and us, and a Hydrogen leaving and rejoining it."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
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
from tests.browser.helpers import BROWSER_DIR
from tests.browser.peer_pages import PeerPage, peer_server, poll_until
from tests.mesh_members import mesh_member

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
PAGE = BROWSER_DIR / "hydrogen"
FN = "runHydrogen"
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
        peer_server(page_dist, chromium, FN) as server,
    ):
        me = f"{py.user_id}|{client.device_id}"
        page = server.start(options(hs, hy, room))
        await page.until(
            lambda: (
                all(decoded(call.engine, hy.user_id, k) > 20 for k in ("video", "audio"))
                and page.decoded(me, "video") > 20  # decoded in Chromium by Hydrogen's connection
                and page.decoded(me, "audio") > 0
            ),
            40,
            "audio and video decoded both ways",
        )
        peer = hydrogen_device(call, hy.user_id)
        assert peer is not None
        page.leave()
        result = await page.result()
        assert result["callId"] == call.conf_id
        # Hydrogen accepts only Olm: everything we sent it went that way.
        assert call.sent[(peer.device_id, "olm")] > 0
        assert call.sent[(peer.device_id, "plaintext")] == 0
        # Its leave: the hangup reaches us and the link closes.
        await poll_until(
            None,
            lambda: call.engine is not None and call.engine.link_for(peer) is None,
            15,
            "Hydrogen's hangup / leave",
        )
        assert call.dropped_signalling == 0


async def test_hydrogen_calls_us_video_only_and_our_hangup_arrives(
    turn_synapse: Synapse, chromium: Chromium, page_dist: Path
) -> None:
    hs = turn_synapse
    hy, py = await register(hs, "hya-hydrogen"), await register(hs, "hyz-py")  # Hydrogen calls
    room = await hs.create_call_room(py, invite=[hy])
    async with (
        Homeserver(hs.base_url, Login(py.user_id, password=py.password)) as client,
        peer_server(page_dist, chromium, FN) as server,
    ):
        me = f"{py.user_id}|{client.device_id}"
        async with mesh_member(
            client, room, sources=[SyntheticVideoTrack(320, 240, 15)], config=CONFIG
        ) as call:
            page = server.start(options(hs, hy, room, audio=False, untilHangupFrom=me))
            await page.until(
                lambda: (
                    decoded(call.engine, hy.user_id, "video") > 20
                    and page.decoded(me, "video") > 10
                ),
                40,
                "video decoded both ways",
            )
            assert decoded(call.engine, hy.user_id, "audio") == 0  # a video-only call
        result = await page.result()  # we left: Hydrogen saw us go
        assert result["elapsedMs"] < 40_000, result
        ours = result["stats"][me]
        assert ours["video"] > 10, ours
        assert ours["audioPackets"] == 0, ours


async def test_three_party_mesh_two_hydrogens_and_us_then_one_rejoins(
    turn_synapse: Synapse, chromium: Chromium, page_dist: Path
) -> None:
    """Two Hydrogen pages (each served on its own origin: separate storage) and us in one
    2022 call; every pair decodes the other's video. One Hydrogen leaves and logs in again (a
    new device): the mesh re-forms with it, the other Hydrogen included."""
    hs = turn_synapse
    ha, py, hz = [await register(hs, p) for p in ("hy3a-hydrogen", "hy3m-py", "hy3z-hydrogen")]
    room = await hs.create_call_room(py, invite=[ha, hz])
    media = [SyntheticVideoTrack(320, 240, 15), ToneAudioTrack()]
    async with (
        Homeserver(hs.base_url, Login(py.user_id, password=py.password)) as client,
        mesh_member(client, room, sources=media, config=CONFIG) as call,
        peer_server(page_dist, chromium, FN) as server_a,
        peer_server(page_dist, chromium, FN) as server_z,
    ):
        me = f"{py.user_id}|{client.device_id}"
        pa = server_a.start(options(hs, ha, room))
        pz = server_z.start(options(hs, hz, room))

        def key(page: PeerPage, user_id: str) -> str | None:
            return next((k for k in page.stats if k.startswith(user_id + "|")), None)

        def pair_decoded(page: PeerPage, other_user: str) -> bool:
            k = key(page, other_user)
            return k is not None and page.decoded(k) > 20

        await pa.until(
            lambda: (
                all(decoded(call.engine, u.user_id, "video") > 20 for u in (ha, hz))
                and all(p.decoded(me) > 20 for p in (pa, pz))
                and pair_decoded(pa, hz.user_id)
                and pair_decoded(pz, ha.user_id)
            ),
            45,
            "video decoded between every pair of the three",
        )
        first = hydrogen_device(call, ha.user_id)
        assert first is not None
        pa.leave()
        await pa.result()
        await poll_until(
            pz.task,
            lambda: call.engine is not None and call.engine.link_for(first) is None,
            15,
            "the leaving Hydrogen's hangup",
        )
        again = server_a.start(options(hs, ha, room))
        await again.until(
            lambda: (
                (dev := hydrogen_device(call, ha.user_id)) is not None
                and dev != first
                and decoded(call.engine, ha.user_id, "video") > 20
                and again.decoded(me) > 20
                and pair_decoded(again, hz.user_id)
                and (k := key(pz, ha.user_id)) is not None
                and k != f"{first.user_id}|{first.device_id}"
                and pz.decoded(k) > 20
            ),
            40,
            "the rejoined Hydrogen in the mesh again",
        )
        again.leave()
        pz.leave()
        await asyncio.gather(again.result(), pz.result())
        assert call.dropped_signalling == 0
