"""``matrixrtc.Call`` over the real stack: two calls in one process, each its own device.

Over the mesh and over LiveKit (through our authorization service), in an encrypted room (so
media is end-to-end encrypted with Olm-distributed keys): Alice publishes a synthetic video
track; Bob's ``frames()`` yields decoded ``av`` frames from her, attributed to her participant
and to the transport that carried them; publishing a track of another size replaces what Bob
receives; Bob's ``events()`` shows her joining, keys being installed, the transport starting,
and her leaving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import av
import pytest
import pytest_asyncio

from matrixrtc import (
    Call,
    CallOptions,
    KeyEvent,
    KeyEventKind,
    MediaKind,
    ParticipantsChanged,
    RemoteFrame,
    SwitchRecord,
)
from matrixrtc.devstack import AuthService, LiveKit, Synapse, UserCreds
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from tests.conftest import UserFactory

pytestmark = pytest.mark.integration

OPTIONS = CallOptions(mesh_host_addresses=("127.0.0.1",), turn_from_homeserver=False)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sfu(synapse: Synapse, livekit: LiveKit, run_dir: Path) -> AsyncIterator[AuthService]:
    svc = AuthService(run_dir, livekit, synapse, name="lk-sfu-call", full_access=None)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def _call(synapse: Synapse, user: UserCreds, room: str, transport: str, sfu_url: str) -> Call:
    """``transport``: mesh, sfu (the SDK engine) or sfu-aiortc (our engine)."""
    return Call(
        room,
        homeserver=synapse.base_url,
        user=user.user_id,
        password=user.password,
        transport="mesh" if transport == "mesh" else "sfu",
        sfu_url=sfu_url,
        options=replace(OPTIONS, sfu_engine="aiortc") if transport == "sfu-aiortc" else OPTIONS,
    )


def _kind(transport: str) -> MediaKind:
    return MediaKind.MESH if transport == "mesh" else MediaKind.SFU


async def _video_from(
    frames: AsyncIterator[RemoteFrame], user_id: str, size: tuple[int, int]
) -> RemoteFrame:
    async for f in frames:
        frame = f.frame
        if not isinstance(frame, av.VideoFrame) or f.participant.user_id != user_id:
            continue
        if (frame.width, frame.height) == size:
            return f
    raise AssertionError("the call ended before the frame arrived")


@pytest.mark.parametrize("transport", ["mesh", "sfu", "sfu-aiortc"])
async def test_call_publishes_and_receives_decoded_frames_and_reports_events(
    synapse: Synapse, sfu: AuthService, user_factory: UserFactory, transport: str
) -> None:
    alice, bob = await user_factory("alice"), await user_factory("bob")
    room = await synapse.create_call_room(alice, invite=[bob], encrypted=True)
    big, small = SyntheticVideoTrack(320, 240, 15), SyntheticVideoTrack(160, 120, 15)
    try:
        async with _call(synapse, bob, room, transport, sfu.url) as b:
            with b.events() as events, b.frames("video") as frames:
                async with _call(synapse, alice, room, transport, sfu.url) as a:
                    a.publish(big)
                    async with asyncio.timeout(30):
                        first = await _video_from(frames, alice.user_id, (320, 240))
                    assert isinstance(first.frame, av.VideoFrame)
                    assert first.kind == "video"
                    assert first.transport is _kind(transport)
                    # The engine asked for carries the media (on the SFU: its connections').
                    engine = {"mesh": "mesh", "sfu": "sdk", "sfu-aiortc": "aiortc"}[transport]
                    assert b.media_engine == engine
                    assert a.media_engine == engine
                    assert not first.participant.is_self
                    a.publish(small)  # replaces the big one, nothing renegotiated
                    async with asyncio.timeout(20):
                        await _video_from(frames, alice.user_id, (160, 120))
                    assert a.transport is _kind(transport)
                    assert [p.user_id for p in a.participants] == [bob.user_id, alice.user_id]
                seen: list[object] = []
                async with asyncio.timeout(20):
                    async for ev in events:
                        seen.append(ev)
                        if isinstance(ev, ParticipantsChanged) and any(
                            p.user_id == alice.user_id for p in ev.left
                        ):
                            break
        joined = [p.user_id for e in seen if isinstance(e, ParticipantsChanged) for p in e.joined]
        assert alice.user_id in joined
        installed = [
            e for e in seen if isinstance(e, KeyEvent) and e.kind is KeyEventKind.INSTALLED
        ]
        assert any(e.user_id == alice.user_id for e in installed), seen
        assert any(isinstance(e, SwitchRecord) and e.new is _kind(transport) for e in seen), seen
    finally:
        big.stop()
        small.stop()


async def test_call_refuses_sfu_without_a_focus(
    synapse: Synapse, user_factory: UserFactory
) -> None:
    alice = await user_factory("alice")
    room = await synapse.create_call_room(alice)
    from matrixrtc import ConfigError

    with pytest.raises(ConfigError, match="no LiveKit focus"):
        async with Call(
            room,
            homeserver=synapse.base_url,
            user=alice.user_id,
            password=alice.password,
            transport="sfu",
        ):
            pass


@pytest.mark.parametrize(
    ("transport", "bob_sends"), [("mesh", "audio"), ("sfu", "audio"), ("sfu", "nothing")]
)
async def test_the_first_switch_settles_on_what_the_peer_publishes(
    synapse: Synapse, sfu: AuthService, user_factory: UserFactory, transport: str, bob_sends: str
) -> None:
    """Bob publishes audio only, or nothing (a listener); Alice's transport start is complete
    (carried) once Bob's audio reaches her, or a moment after Bob is in the room announcing
    nothing, not after ``settle_timeout_s`` (10 s) waiting for media he never sends. (The
    mesh knows "nothing" from Bob's muted kinds: tests/unit/test_transport_carries.py.)"""
    alice, bob = await user_factory("alice"), await user_factory("bob")
    room = await synapse.create_call_room(alice, invite=[bob], encrypted=True)
    tone, video = ToneAudioTrack(), SyntheticVideoTrack(320, 240, 15)
    try:
        b = _call(synapse, bob, room, transport, sfu.url)
        if bob_sends == "audio":
            b.publish(tone)
        async with b:
            a = _call(synapse, alice, room, transport, sfu.url)
            a.publish(video)
            with a.events() as events:
                async with a:
                    async with asyncio.timeout(15):
                        record = None
                        while record is None:
                            ev = await events.get()
                            record = ev if isinstance(ev, SwitchRecord) else None
        assert record.new is MediaKind(transport)
        assert record.members == 2
        assert record.carried_at is not None, f"settled by timeout, not on Bob's {bob_sends}"
        assert record.carried_at - record.started_at < 5.0
    finally:
        tone.stop()
        video.stop()


async def test_call_with_simulcast_receivers_of_many_videos_take_the_low_layer(
    synapse: Synapse, sfu: AuthService, user_factory: UserFactory
) -> None:
    """``CallOptions(simulcast=True, low_layer_above=0)`` on the aiortc engine: Alice publishes
    320×240 as two layers and Bob, past his limit of remote videos, decodes her 160×120 one.
    (A call's tracks go out audio first: the RID extension once shared an id with audio's
    level extension there, and LiveKit never saw a layer.)"""
    alice, bob = await user_factory("alice"), await user_factory("bob")
    room = await synapse.create_call_room(alice, invite=[bob], encrypted=True)
    layered = replace(OPTIONS, sfu_engine="aiortc", simulcast=True, low_layer_above=0)
    big = SyntheticVideoTrack(320, 240, 15)

    def call(user: UserCreds) -> Call:
        return Call(
            room,
            homeserver=synapse.base_url,
            user=user.user_id,
            password=user.password,
            transport="sfu",
            sfu_url=sfu.url,
            options=layered,
        )

    try:
        async with call(bob) as b, call(alice) as a:
            with b.frames("video") as frames:
                a.publish(big)
                async with asyncio.timeout(30):
                    first = await _video_from(frames, alice.user_id, (160, 120))
                assert first.transport is MediaKind.SFU
                sizes: list[tuple[int, int]] = []
                async with asyncio.timeout(20):
                    async for f in frames:
                        if f.participant.user_id == alice.user_id:
                            assert isinstance(f.frame, av.VideoFrame)
                            sizes.append((f.frame.width, f.frame.height))
                            if len(sizes) == 15:
                                break
                assert set(sizes) == {(160, 120)}, sizes  # settled on the low layer
    finally:
        big.stop()
