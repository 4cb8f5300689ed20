"""The mesh engine with peers that send only some kinds of media (Hydrogen starts video-only
calls; a bot may send audio only), over real aiortc peer connections on 127.0.0.1.

A hand-driven aiortc peer plays a browser that offers one video m-line and no audio one: the
engine must answer that offer with exactly one video m-line (aiortc used to fail with "None is
not in list" because an audio track was attached regardless) and media must flow both ways.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.media.sinks import CountingSink, ReceiveStats
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.engine import MeshConfig, MeshEngine
from matrixrtc.mesh.ice import gather_on
from matrixrtc.session.mesh_signalling import DeviceRef, LocalDevice, mesh_conf_id

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("MATRIXRTC_IN_NETNS") != "1" and os.environ.get("MATRIXRTC_NO_NETNS") != "1",
        reason="media tests run inside the private network namespace (scripts/in-netns)",
    ),
]

CONF = mesh_conf_id("!subsets:localhost")
FPS = 15
CONFIG = MeshConfig(host_addresses=("127.0.0.1",), remote_networks=("127.0.0.0/8",))


@dataclass
class Outbox:
    """To-device messages engines send, kept and optionally delivered to other engines."""

    engines: dict[DeviceRef, MeshEngine] = field(default_factory=dict)
    sent: list[tuple[DeviceRef, DeviceRef, str, dict[str, Any]]] = field(default_factory=list)

    def sender_for(self, origin: DeviceRef) -> _Sender:
        return _Sender(self, origin)


@dataclass
class _Sender:
    outbox: Outbox
    origin: DeviceRef

    async def send_to_device(
        self, user_id: str, device_id: str, event_type: str, content: Mapping[str, Any]
    ) -> None:
        target = DeviceRef(user_id, device_id)
        self.outbox.sent.append((self.origin, target, event_type, dict(content)))
        engine = self.outbox.engines.get(target)
        if engine is not None:
            asyncio.get_running_loop().call_soon(
                engine.receive, self.origin.user_id, event_type, dict(content)
            )


def ref(n: str) -> DeviceRef:
    return DeviceRef(f"@{n.lower()}:localhost", n)


def session(r: DeviceRef) -> str:
    return f"sess-{r.device_id}"


def make_engine(outbox: Outbox, r: DeviceRef, sources: list[MediaStreamTrack]) -> MeshEngine:
    engine = MeshEngine(
        LocalDevice(user_id=r.user_id, device_id=r.device_id, session_id=session(r), conf_id=CONF),
        outbox.sender_for(r),
        sources=sources,
        config=CONFIG,
    )
    outbox.engines[r] = engine
    return engine


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def decoded(engine: MeshEngine, peer: DeviceRef, kind: str) -> int:
    link = engine.link_for(peer)
    if link is None or kind not in link.stats:
        return 0
    return link.stats[kind].frames_decoded


def m_lines(sdp: str) -> list[str]:
    return re.findall(r"^m=(\w+) ", sdp, flags=re.M)


@pytest.fixture
async def outbox() -> AsyncIterator[Outbox]:
    box = Outbox()
    yield box
    await asyncio.gather(*(e.aclose() for e in box.engines.values()))


async def test_a_video_only_offer_gets_a_video_only_answer_and_media_flows(outbox: Outbox) -> None:
    caller, callee = ref("AAA"), ref("BBB")  # AAA sorts lower: it calls
    engine = make_engine(outbox, callee, [SyntheticVideoTrack(320, 240, FPS), ToneAudioTrack()])
    engine.start()
    engine.set_members({caller: session(caller), callee: session(callee)})

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    stats = ReceiveStats(kind="video")
    sinks: list[CountingSink] = []

    @pc.on("track")
    def _on_track(track: MediaStreamTrack) -> None:
        sink = CountingSink(track, stats if track.kind == "video" else ReceiveStats(kind="audio"))
        sinks.append(sink)
        sink.start()

    try:
        pc.addTrack(SyntheticVideoTrack(320, 240, FPS))  # video only: no audio m-line at all
        description = await pc.createOffer()
        await gather_on(pc, ("127.0.0.1",))
        await pc.setLocalDescription(description)
        offer = pc.localDescription.sdp
        assert m_lines(offer) == ["video"]
        stream_id = re.findall(r"a=msid:(\S+) ", offer)[0]
        engine.receive(
            caller.user_id,
            "m.call.invite",
            {
                "call_id": "cvideoonly",
                "party_id": caller.device_id,
                "version": 1,  # Hydrogen writes an integer
                "conf_id": CONF,
                "device_id": caller.device_id,
                "sender_session_id": session(caller),
                "dest_session_id": session(callee),
                "seq": 4,  # Hydrogen's per-device counter: a retry does not start at 0
                "lifetime": 60000,
                "offer": {"type": "offer", "sdp": offer},
                "org.matrix.msc3077.sdp_stream_metadata": {
                    stream_id: {"purpose": "m.usermedia", "audio_muted": True, "video_muted": False}
                },
            },
        )

        def answer() -> dict[str, Any] | None:
            for _o, _t, ty, content in outbox.sent:
                if ty == "m.call.answer":
                    return content
            return None

        # Delivered at once (no seq-gap wait), answered with exactly the offered m-line.
        await wait_for(lambda: answer() is not None, 3.0, "the engine's answer")
        content = answer()
        assert content is not None
        assert m_lines(content["answer"]["sdp"]) == ["video"]
        assert not any(ty == "m.call.hangup" for _o, _t, ty, _c in outbox.sent)
        await pc.setRemoteDescription(RTCSessionDescription(**content["answer"]))

        await wait_for(
            lambda: decoded(engine, caller, "video") > 10 and stats.frames_decoded > 10,
            15,
            "video decoded both ways",
        )
        assert decoded(engine, caller, "audio") == 0
    finally:
        await pc.close()
        for sink in sinks:
            await sink.aclose()


async def test_a_caller_without_audio_still_receives_the_callees_audio(outbox: Outbox) -> None:
    caller, callee = ref("AAA"), ref("BBB")
    video_only = make_engine(outbox, caller, [SyntheticVideoTrack(320, 240, FPS)])
    both = make_engine(outbox, callee, [SyntheticVideoTrack(320, 240, FPS), ToneAudioTrack()])
    members = {caller: session(caller), callee: session(callee)}
    for e in (video_only, both):
        e.start()
        e.set_members(members)
    await wait_for(
        lambda: (
            decoded(video_only, callee, "audio") > 20
            and decoded(video_only, callee, "video") > 10
            and decoded(both, caller, "video") > 10
        ),
        15,
        "the callee's audio and video at the caller, the caller's video at the callee",
    )
    invite = next(c for _o, _t, ty, c in outbox.sent if ty == "m.call.invite")
    assert sorted(m_lines(invite["offer"]["sdp"])) == ["audio", "video"]
    assert "a=recvonly" in invite["offer"]["sdp"]
    assert decoded(both, caller, "audio") == 0
