"""``RoomConnection.hush()`` against a real LiveKit, on both engines (``MediaOptions.engine``):
the SDK's ``LiveKitConnection`` and our ``AiortcConnection``.

What leaving an SFU call while lingering on it relies on (``MediaSwitcher``: hush, then close
after ``leave_linger_s``): once hushed, a publisher hands no more frames to its tracks, and
an observer in the room receives no more of its video, while its track publications stay
(LiveKit reshuffles nothing until the connection closes). An observing connection on the SDK
(it decodes and counts every frame as it arrives) watches the publisher; the server's own
participant list confirms the tracks are still published.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from livekit import api

from matrixrtc.devstack import LiveKit
from matrixrtc.livekit import (
    Endpoint,
    KeyTable,
    LiveKitConnection,
    MediaOptions,
    RoomConnection,
    SfuCredentials,
)
from matrixrtc.livekit.connection import ConnectionState, SfuEngine
from matrixrtc.livekit.transport import ConnectionFactory
from matrixrtc.media_transport.aiortc_engine import AiortcConnection

pytestmark = pytest.mark.integration

FPS = 15.0
FLOW_TIMEOUT_S = 10.0  # connect, publish, subscribe and the first frames
SETTLE_S = 0.5  # after hush(): frames already encoded or in the jitter buffer arrive
WINDOW_S = 1.0  # ~15 frames when not hushed
IN_FLIGHT = 2  # frames a window may still see after the settle


def _credentials(lk: LiveKit, room: str, identity: str) -> SfuCredentials:
    jwt = (
        api.AccessToken(lk.api_key, lk.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )
    return SfuCredentials(
        url=lk.url, jwt=jwt, identity=identity, room=room, endpoint=Endpoint.GET_TOKEN
    )


def _connection(engine: SfuEngine, creds: SfuCredentials, *, publish: bool) -> RoomConnection:
    # The factory the SFU media transport uses (media_transport.sfu).
    factory: ConnectionFactory = AiortcConnection if engine == "aiortc" else LiveKitConnection
    return factory(
        creds,
        publish=publish,
        media=MediaOptions(width=160, height=120, fps=FPS, engine=engine),
        e2ee=False,  # hush() is below the frame cryptor on both engines
        clock=time.monotonic,
        on_state=lambda _: None,
        stats=None,
        sent=None,
        keys=KeyTable(),
        sources=None,
        frames=None,
        subscribe_when_keyed=False,
    )


@pytest.fixture
async def room(livekit: LiveKit) -> AsyncIterator[str]:
    name = f"hush-{uuid.uuid4().hex[:8]}"  # the devstack's LiveKit does not auto-create rooms
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        await lkapi.room.create_room(api.CreateRoomRequest(name=name))
        yield name
        await lkapi.room.delete_room(api.DeleteRoomRequest(room=name))


@pytest.mark.parametrize("engine", ["sdk", "aiortc"])
async def test_hushed_publisher_sends_no_frames_and_stays_published(
    livekit: LiveKit, room: str, engine: SfuEngine
) -> None:
    publisher = _connection(engine, _credentials(livekit, room, "publisher"), publish=True)
    observer = _connection("sdk", _credentials(livekit, room, "observer"), publish=False)
    assert isinstance(observer, LiveKitConnection)
    try:
        async with asyncio.timeout(FLOW_TIMEOUT_S):
            await publisher.connect()
            await observer.connect()
        assert publisher.engine == engine
        me = publisher.identity

        def received() -> int:
            st = observer.stats.get(me)
            return 0 if st is None else st.video_frames

        async with asyncio.timeout(FLOW_TIMEOUT_S):  # the observer's first frames
            while received() < 10:
                assert publisher.state is ConnectionState.CONNECTED
                await asyncio.sleep(0.05)
        # Frames flow at about the frame rate: the window below would see them.
        publisher.refresh()
        sent0, got0 = publisher.sent.video_frames, received()
        await asyncio.sleep(WINDOW_S)
        publisher.refresh()
        sent_flowing = publisher.sent.video_frames - sent0
        got_flowing = received() - got0
        assert sent_flowing >= FPS * WINDOW_S / 2, sent_flowing
        assert got_flowing >= FPS * WINDOW_S / 2, got_flowing

        publisher.hush()
        await asyncio.sleep(SETTLE_S)
        publisher.refresh()
        sent1, audio1, got1 = (
            publisher.sent.video_frames,
            publisher.sent.audio_frames,
            received(),
        )
        await asyncio.sleep(WINDOW_S)
        publisher.refresh()
        sent_hushed = publisher.sent.video_frames - sent1
        audio_hushed = publisher.sent.audio_frames - audio1
        got_hushed = received() - got1
        print(
            f"{engine}: 1 s flowing sent {sent_flowing} received {got_flowing}; "
            f"hushed sent {sent_hushed} (audio {audio_hushed}) received {got_hushed}"
        )
        # (1) the publisher hands no more frames to its tracks
        assert sent_hushed <= 1, sent_hushed
        assert audio_hushed <= 1, audio_hushed
        # (2) so no more of its video reaches the observer
        assert got_hushed <= IN_FLIGHT, got_hushed
        # (3) while it stays in the room with its tracks published and unmuted, as the
        # observer and the server see it
        assert publisher.state is ConnectionState.CONNECTED
        assert observer.published_kinds(me) == frozenset({"audio", "video"})
        async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
            listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
        (info,) = [p for p in listed.participants if p.identity == me]
        kinds = sorted((t.type, t.muted) for t in info.tracks)
        assert kinds == [(api.TrackType.AUDIO, False), (api.TrackType.VIDEO, False)], info.tracks
    finally:
        await observer.aclose()
        await publisher.aclose()
