"""``python -m matrixrtc legacy-call`` against an in-process :class:`LegacyMeshCall` over a
real Synapse: it joins the room's 2022 call, both sides decode each other, it reports its
peer's frames, and after ``--duration`` it leaves (its ``m.calls`` entry is gone)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import pytest

from matrixrtc.devstack import Synapse
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.session.mesh_signalling import DeviceRef
from tests.mesh_members import mesh_member

pytestmark = [
    pytest.mark.integration,
    pytest.mark.media_matrix,
    pytest.mark.skipif(
        os.environ.get("MATRIXRTC_IN_NETNS") != "1" and os.environ.get("MATRIXRTC_NO_NETNS") != "1",
        reason="media tests run inside the private network namespace (scripts/in-netns)",
    ),
]

CONFIG = MeshConfig(host_addresses=("127.0.0.1",), remote_networks=("127.0.0.0/8",))


async def test_legacy_call_cli_joins_decodes_and_leaves(
    synapse: Synapse, user_factory: Any, tmp_path: Any
) -> None:
    a, b = await user_factory("lcli-a"), await user_factory("lcli-b")
    room = await synapse.create_call_room(a, invite=[b])
    async with (
        Homeserver(synapse.base_url, Login(a.user_id, password=a.password)) as ha,
        mesh_member(
            ha, room, sources=[SyntheticVideoTrack(320, 240, 15), ToneAudioTrack()], config=CONFIG
        ) as call,
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "matrixrtc", "--log-level", "warning", "legacy-call",
            "--homeserver", synapse.base_url, "--user", b.user_id, "--room", room,
            "--state-dir", str(tmp_path / "b"), "--mesh-host", "127.0.0.1",
            "--duration", "10", "--output", "json",
            env={**os.environ, "MATRIXRTC_PASSWORD": b.password},
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
        joined = next(e for e in events if e["event"] == "joined")
        assert joined["conf_id"] == call.conf_id
        peer = f"{a.user_id}/{ha.device_id}"
        seen = [e["peers"][peer] for e in events if e["event"] == "peers" and peer in e["peers"]]
        assert seen, events
        assert seen[-1].get("video", 0) > 10, events
        assert seen[-1].get("audio", 0) > 10, events
        assert events[-1] == {"event": "left", "reason": "duration"}
        b_ref = DeviceRef(b.user_id, joined["device_id"])
        assert (
            call.received[(b_ref.device_id, "m.call.hangup")]
            + call.received[(b_ref.device_id, "m.call.answer")]
            >= 1
        )
        deadline = time.monotonic() + 10
        while call.engine is not None and call.engine.link_for(b_ref) is not None:
            assert time.monotonic() < deadline, "the CLI's peer connection is still open"
            await asyncio.sleep(0.1)
        state = await ha.get_state_event(room, "org.matrix.msc3401.call.member", b.user_id)
        assert state == {"m.calls": []}
