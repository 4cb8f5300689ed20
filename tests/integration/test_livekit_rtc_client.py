"""Our own LiveKit client (``matrixrtc.livekit.rtc_client``) against a real LiveKit v1.13.5:
join, the keepalive, the subscriber peer connection (server offer, our answer, trickled ICE
on 127.0.0.1) carrying the media an SDK participant publishes, and leave."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from livekit import api, rtc

from matrixrtc.devstack import LiveKit
from matrixrtc.livekit.rtc_client import RtcClient


def _token(lk: LiveKit, room: str, identity: str) -> str:
    return (
        api.AccessToken(lk.api_key, lk.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


async def _publish(room: rtc.Room, stop: asyncio.Event) -> None:
    video = rtc.VideoSource(320, 240)
    audio = rtc.AudioSource(48000, 1)
    await room.local_participant.publish_track(
        rtc.LocalVideoTrack.create_video_track("v", video),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA, simulcast=False),
    )
    await room.local_participant.publish_track(
        rtc.LocalAudioTrack.create_audio_track("a", audio),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
    )
    i = 0
    while not stop.is_set():
        shade = bytes([i % 256, 64, 128, 255]) * (320 * 240)
        video.capture_frame(rtc.VideoFrame(320, 240, rtc.VideoBufferType.RGBA, shade))
        for _ in range(3):
            await audio.capture_frame(rtc.AudioFrame.create(48000, 1, 480))
        i += 1
        await asyncio.sleep(1 / 15)


@pytest.fixture
async def sdk_publisher(livekit: LiveKit) -> AsyncIterator[tuple[str, rtc.Room]]:
    name = f"rtc-client-{uuid.uuid4().hex[:8]}"
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        await lkapi.room.create_room(api.CreateRoomRequest(name=name))
    room = rtc.Room()
    await room.connect(livekit.url, _token(livekit, name, "sdk"), rtc.RoomOptions())
    stop = asyncio.Event()
    task = asyncio.create_task(_publish(room, stop))
    try:
        yield name, room
    finally:
        stop.set()
        await task
        await room.disconnect()


async def _packets(client: RtcClient) -> dict[str, int]:
    counts: dict[str, int] = {}
    for track_id, received in client.tracks.items():
        assert client._sub is not None
        for t in client._sub.pc.getTransceivers():
            if t.receiver.track is received.track:
                stats = await t.receiver.getStats()
                counts[track_id] = sum(
                    getattr(s, "packetsReceived", 0)
                    for s in stats.values()
                    if s.type == "inbound-rtp"
                )
    return counts


async def test_joins_answers_the_subscriber_offer_and_receives_media(
    livekit: LiveKit, sdk_publisher: tuple[str, rtc.Room]
) -> None:
    name, sdk_room = sdk_publisher
    client = RtcClient(livekit.url, _token(livekit, name, "ours"))
    joined = await client.connect()
    try:
        assert joined.identity == "ours"
        assert joined.room_name == name
        assert joined.others == ("sdk",)
        async with asyncio.timeout(15):
            while len(client.tracks) < 2 or client.pongs < 1:
                assert client.error is None, client.error
                await asyncio.sleep(0.1)
        assert sorted(t.kind for t in client.tracks.values()) == ["audio", "video"]
        published = {p.sid for p in sdk_room.local_participant.track_publications.values()}
        assert set(client.tracks) == published  # keyed by LiveKit's track sid
        first = await _packets(client)
        await asyncio.sleep(1.5)
        second = await _packets(client)
        kinds = {t.track_id: t.kind for t in client.tracks.values()}
        for track_id in published:
            # Silent audio goes out as Opus DTX (a few packets a second); video is ~15 fps.
            least = 10 if kinds[track_id] == "video" else 1
            assert second[track_id] >= first[track_id] + least, (first, second)
    finally:
        await client.aclose()
    assert client.error is None
    # leave reached the server: the SDK participant sees us go.
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=name))
    assert [p.identity for p in listed.participants] == ["sdk"]
