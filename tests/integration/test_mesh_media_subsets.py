"""The mesh engine with peers that send only some kinds of media (Hydrogen starts video-only
calls; a bot may send audio only), over real aiortc peer connections on 127.0.0.1.

A hand-driven aiortc peer plays a browser that offers one video m-line and no audio one: the
engine must answer that offer with exactly one video m-line (aiortc used to fail with "None is
not in list" because an audio track was attached regardless) and media must flow both ways.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.media.sinks import CountingSink, ReceiveStats
from matrixrtc.media.sources import SyntheticVideoTrack
from matrixrtc.mesh.ice import gather_on
from tests.integration.mesh_rig import (
    CONF,
    FPS,
    IN_NETNS,
    Router,
    decoded,
    make_engine,
    received,
    ref,
    session,
    wait_for,
)

pytestmark = [pytest.mark.integration, IN_NETNS]


def m_lines(sdp: str) -> list[str]:
    return re.findall(r"^m=(\w+) ", sdp, flags=re.M)


async def test_a_video_only_offer_gets_a_video_only_answer_and_media_flows(
    mesh_router: Router,
) -> None:
    caller, callee = ref("AAA"), ref("BBB")  # AAA sorts lower: it calls
    engine = make_engine(mesh_router, callee)
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
            for _o, _t, ty, content in mesh_router.sent:
                if ty == "m.call.answer":
                    return content
            return None

        # Delivered at once (no seq-gap wait), answered with exactly the offered m-line.
        await wait_for(lambda: answer() is not None, 3.0, "the engine's answer")
        content = answer()
        assert content is not None
        assert m_lines(content["answer"]["sdp"]) == ["video"]
        assert not any(ty == "m.call.hangup" for _o, _t, ty, _c in mesh_router.sent)
        await pc.setRemoteDescription(RTCSessionDescription(**content["answer"]))

        await wait_for(
            lambda: decoded(engine, caller, "video") > 10 and stats.frames_decoded > 10,
            15,
            "video decoded both ways",
        )
        assert received(engine, caller, "audio") == 0
    finally:
        await pc.close()
        for sink in sinks:
            await sink.aclose()


async def test_a_caller_without_audio_still_receives_the_callees_audio(mesh_router: Router) -> None:
    caller, callee = ref("AAA"), ref("BBB")
    video_only = make_engine(mesh_router, caller, sources=[SyntheticVideoTrack(320, 240, FPS)])
    both = make_engine(mesh_router, callee)
    members = {caller: session(caller), callee: session(callee)}
    for e in (video_only, both):
        e.start()
        e.set_members(members)
    await wait_for(
        lambda: (
            received(video_only, callee, "audio") > 20
            and decoded(video_only, callee, "video") > 10
            and decoded(both, caller, "video") > 10
        ),
        15,
        "the callee's audio and video at the caller, the caller's video at the callee",
    )
    invite = next(c for _o, _t, ty, c in mesh_router.sent if ty == "m.call.invite")
    assert sorted(m_lines(invite["offer"]["sdp"])) == ["audio", "video"]
    assert "a=recvonly" in invite["offer"]["sdp"]
    assert received(both, caller, "audio") == 0
