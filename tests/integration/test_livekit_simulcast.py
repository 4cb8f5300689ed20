"""Simulcast from our own LiveKit client (``RtcClient.publish(layers=...)``) through a real
LiveKit v1.13.5: the server takes both layers of one video track (RIDs ``q`` and ``h`` on
their own SSRCs, E2EE per frame), a subscriber that asks for the low layer decodes frames of
the low layer's size and one that asks for the high layer the full size, and dynacast tells
the publisher which layers are wanted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import av
from aiortc.mediastreams import MediaStreamError
from livekit import api

from matrixrtc.devstack import LiveKit
from matrixrtc.e2ee import KeyRings
from matrixrtc.livekit import signal
from matrixrtc.livekit.rtc_client import ReceivedTrack, RtcClient
from matrixrtc.livekit.simulcast import layers_for
from matrixrtc.media.sinks import ReceiveStats
from matrixrtc.media.sources import ScaledFeed, SyntheticVideoTrack
from matrixrtc.mesh.fanout import (
    DEFAULT_VIDEO_BITRATE,
    SharedEncoder,
    adopt_sender,
    install_receive_hook,
)
from matrixrtc.mesh.transform import CryptorTransform
from tests.integration._livekit import join_token

KEY = bytes(range(32, 48))


@dataclass
class _Viewer:
    sizes: list[tuple[int, int]] = field(default_factory=list)
    stats: dict[str, ReceiveStats] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    keys: KeyRings = field(default_factory=KeyRings)
    sif_trailer: bytes = b""

    def on_track(self, received: ReceivedTrack) -> None:
        if received.kind != "video":
            return
        stats = self.stats[received.track_id] = ReceiveStats(kind="video")
        install_receive_hook(
            received.receiver,
            decryptor=self.keys.cryptor("pub", sif_trailer=self.sif_trailer),
            stats=stats,
            decode=True,
        )
        self.tasks.append(asyncio.create_task(self._read(received)))

    async def _read(self, received: ReceivedTrack) -> None:
        try:
            while True:
                frame = await received.track.recv()
                assert isinstance(frame, av.VideoFrame)
                self.sizes.append((frame.width, frame.height))
        except MediaStreamError:
            pass


async def _until(check: Callable[[], bool], timeout_s: float, clients: list[RtcClient]) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            assert all(c.error is None for c in clients)
            await asyncio.sleep(0.1)


async def test_low_and_high_subscribers_get_their_layer(livekit: LiveKit) -> None:
    name = f"simulcast-{uuid.uuid4().hex[:8]}"
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        await lkapi.room.create_room(api.CreateRoomRequest(name=name))
    viewers = {"low": _Viewer(), "high": _Viewer()}
    for v in viewers.values():
        v.keys.install("pub", 0, KEY)
    pub = RtcClient(livekit.url, join_token(livekit, name, "pub"))
    subs = {
        q: RtcClient(livekit.url, join_token(livekit, name, f"sub-{q}"), on_track=v.on_track)
        for q, v in viewers.items()
    }
    wanted: list[signal.QualitiesWanted] = []
    pub.on_qualities = wanted.append
    own = KeyRings()
    own.install("pub", 0, KEY)
    transform = CryptorTransform(own.cryptor("pub"), lambda _: own.cryptor("pub"))
    low, high = layers_for(320, 240, DEFAULT_VIDEO_BITRATE)
    feed = ScaledFeed(low.width, low.height)
    top = SharedEncoder(SyntheticVideoTrack(320, 240, 15.0), transform=transform)
    top.tee = feed.feed
    bottom = SharedEncoder(
        feed, transform=transform, default_bitrate=low.bitrate, max_bitrate=low.bitrate
    )
    clients = [pub, *subs.values()]
    try:
        for q, client in subs.items():
            joined = await client.connect()
            viewers[q].sif_trailer = joined.sif_trailer
        await pub.connect()
        top_track, bottom_track = top.subscribe(), bottom.subscribe()
        sids = await pub.publish(
            [top_track],
            on_sender=adopt_sender,
            layers=[(low, bottom_track), (high, top_track)],
        )
        (video_sid,) = sids.values()
        top.start()
        bottom.start()
        await _until(lambda: all(v.stats for v in viewers.values()), 15, clients)
        await subs["low"].set_quality([video_sid], "low")
        await subs["high"].set_quality([video_sid], "high")
        size = {"low": (160, 120), "high": (320, 240)}

        def settled() -> bool:
            # LiveKit moves a subscriber up only as its bandwidth estimate allows: wait for
            # the switch instead of guessing how long it takes.
            return all(v.sizes[-5:] == [size[q]] * 5 for q, v in viewers.items())

        await _until(settled, 20, clients)
        for v in viewers.values():
            v.sizes.clear()
        await _until(lambda: all(len(v.sizes) >= 15 for v in viewers.values()), 20, clients)
        for q, v in viewers.items():
            assert set(v.sizes) == {size[q]}, (q, v.sizes)
        # Including the switch: a frame LiveKit cut short there is dropped, not decrypted.
        for v in viewers.values():
            assert all(s.decrypt_failures == 0 for s in v.stats.values())
        print("wanted", wanted)
    finally:
        for client in clients:
            await client.aclose()
        for e in (top, bottom):
            await e.aclose()
        for v in viewers.values():
            for t in v.tasks:
                t.cancel()
