"""The call's shared encoders (``matrixrtc.media_transport.local_media``): one encoder per kind
for every transport of a make-before-break switch, on real PyAV codecs in-process."""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

import pytest
from aiortc.mediastreams import MediaStreamError

from matrixrtc.call_keys import CallKeys
from matrixrtc.e2ee import KeyRings
from matrixrtc.errors import LocalError
from matrixrtc.livekit import MediaOptions
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.media_transport.local_media import LocalEncoders
from matrixrtc.mesh.engine import MeshEngine
from matrixrtc.mesh.transform import vp8_is_keyframe
from matrixrtc.session.mesh_signalling import LocalDevice

MEDIA = MediaOptions(width=160, height=120, fps=30.0)


class _Keys:
    """What LocalEncoders reads of CallKeys: the rings and our identity in them."""

    def __init__(self, key: bytes) -> None:
        self.identity = "@a:hs:DEV"
        self.rings = KeyRings()
        self.rings.install(self.identity, 3, key)


async def test_the_encoders_are_made_on_first_use_and_then_always_the_same() -> None:
    made: list[int] = []

    def sources() -> list[Any]:
        made.append(1)
        return [SyntheticVideoTrack(160, 120, 30), ToneAudioTrack()]

    local = LocalEncoders(MEDIA, sources=sources, keys=None)
    assert not local.started
    assert made == []
    first = local.get()
    assert local.get() is first
    assert sorted(first) == ["audio", "video"]
    assert made == [1]  # the sources are asked for once, whichever transports come
    await local.aclose()


async def test_two_transports_get_the_same_frames_each_encoded_once() -> None:
    local = LocalEncoders(MEDIA, sources=None, keys=None)
    video = local.get()["video"]
    mesh_peer, sfu = video.subscribe(), video.subscribe()
    try:
        got: dict[int, list[bytes]] = {}
        for _ in range(10):
            for track in (mesh_peer, sfu):
                packet = await asyncio.wait_for(track.recv(), 5)
                got.setdefault(int(packet.pts or 0), []).append(bytes(packet))
        both = [frames for frames in got.values() if len(frames) == 2]
        assert len(both) >= 8
        assert all(a == b for a, b in both)  # the same bytes: one encode, fanned out
        assert video.frames_encoded <= video.frames_in
    finally:
        await local.aclose()


async def test_frames_are_encrypted_with_the_calls_sender_key() -> None:
    key = os.urandom(16)
    local = LocalEncoders(MEDIA, sources=None, keys=cast(CallKeys, _Keys(key)))
    video = local.get()["video"]
    track = video.subscribe()
    try:
        packet = await asyncio.wait_for(track.recv(), 5)
        receiver = KeyRings()
        receiver.install("@a:hs:DEV", 3, key)  # what a remote got over Olm
        clear = receiver.cryptor("@a:hs:DEV").decrypt(bytes(packet), kind="video", codec="vp8")
        assert clear is not None
        assert clear != bytes(packet)
        wrong = KeyRings()
        wrong.install("@a:hs:DEV", 3, os.urandom(16))
        assert wrong.cryptor("@a:hs:DEV").decrypt(bytes(packet), kind="video") is None
        plain = video.subscribe(plain=True)  # an SFU without E2EE, a peer without frame E2EE
        p = await asyncio.wait_for(plain.recv(), 5)
        assert p.is_keyframe or vp8_is_keyframe(bytes(p))  # clear VP8 starts at a key frame
        assert receiver.cryptor("@a:hs:DEV").decrypt(bytes(p), kind="video") is None
    finally:
        await local.aclose()


async def test_close_ends_every_subscriber_stops_the_sources_and_refuses_more() -> None:
    tracks = [SyntheticVideoTrack(160, 120, 30)]
    local = LocalEncoders(MEDIA, sources=lambda: tracks, keys=None)
    sub = local.get()["video"].subscribe()
    await asyncio.wait_for(sub.recv(), 5)
    await local.aclose()

    async def drain() -> None:
        while True:  # what was queued, then the end
            await asyncio.wait_for(sub.recv(), 5)

    with pytest.raises(MediaStreamError):
        await drain()
    assert tracks[0].readyState == "ended"
    with pytest.raises(LocalError):
        local.get()


async def test_a_mesh_on_shared_encoders_neither_closes_them_nor_silences_the_other_transport() -> (
    None
):
    class Sender:
        async def send_to_device(self, *args: Any) -> None:
            raise AssertionError("nothing to send")

    local = LocalEncoders(MEDIA, sources=None, keys=None)
    shared = local.get()
    sfu = shared["video"].subscribe()
    engine = MeshEngine(
        LocalDevice(user_id="@a:b", device_id="D", session_id="s", conf_id="c"),
        Sender(),
        encoders=shared,
    )
    try:
        assert engine.encoders == dict(shared)
        engine.start()
        engine.hush()  # the mesh's own peers only
        await engine.aclose()
        sent = sfu.packets_sent
        for _ in range(5):  # the other transport's track still gets frames
            await asyncio.wait_for(sfu.recv(), 5)
        assert sfu.packets_sent == sent + 5
        assert not sfu.paused
    finally:
        await local.aclose()


async def test_shared_encoders_replace_sources() -> None:
    class Sender:
        async def send_to_device(self, *args: Any) -> None: ...

    local = LocalEncoders(MEDIA, sources=None, keys=None)
    try:
        with pytest.raises(LocalError, match="replace sources"):
            MeshEngine(
                LocalDevice(user_id="@a:b", device_id="D", session_id="s", conf_id="c"),
                Sender(),
                sources=[SyntheticVideoTrack()],
                encoders=local.get(),
            )
    finally:
        await local.aclose()


def test_call_test_report_lists_a_shared_encoder_once() -> None:
    """The call-test report's encoder counters (what the runner's ``sent`` figures are deltas
    of): an encoder both transports publish from is reported once, under ``shared``, not under
    ``mesh`` and ``sfu`` (summed twice during a switch, and counted from 0 again when it
    moves from one transport's key to the other's); a transport's own encoder stays under it."""
    from matrixrtc.calltest.participant import _encoder_report
    from matrixrtc.mesh.fanout import SharedEncoder

    shared = SharedEncoder(SyntheticVideoTrack(64, 48, 15.0))
    own_audio = SharedEncoder(ToneAudioTrack(440.0))
    shared.frames_in = shared.frames_encoded = 30
    own_audio.frames_in = own_audio.frames_encoded = 100
    report = _encoder_report(
        {"video": shared}, mesh={"video": shared}, sfu={"video": shared, "audio": own_audio}
    )
    assert sorted(report) == ["sfu", "shared"]
    assert report["shared"]["video"]["frames_encoded"] == 30
    assert sorted(report["sfu"]) == ["audio"]  # the shared video is not repeated here
    assert report["sfu"]["audio"]["frames_in"] == 100
    # Nothing shared (share_encoders off, or the SDK engine): each transport's own, as before.
    unshared = _encoder_report({}, mesh={"video": shared}, sfu={})
    assert sorted(unshared) == ["mesh"]
