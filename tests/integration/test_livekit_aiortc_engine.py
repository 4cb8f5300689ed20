"""``MediaOptions.engine="aiortc"`` in a real Matrix call on the SFU (issue 19): two call
members on our own LiveKit client (``AiortcConnection``) and one on the livekit SDK, in an
encrypted room, keys from the call's sender-key machinery (Olm to-device). Every member
receives every other's video and, once media flows, no frame fails to decrypt; the SDK member
decrypts what ours publish (encode-once + LiveKit-format E2EE) and ours decrypt the SDK's.
Member 0 also listens on the switcher's frames tap (what ``Call.frames()`` reads): decoded
audio of both others and decoded video of the one it renders (``render_max=1``) reach it, with
the sender and the SFU as carrier, as on the SDK engine.
Real Synapse, our authorization service, LiveKit.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import av
import pytest
import pytest_asyncio

from matrixrtc.agent import AgentConfig, CallAgent, Participant
from matrixrtc.call_keys import CallKeys, CallKeysConfig
from matrixrtc.devstack import AuthService, LiveKit, Synapse, UserCreds
from matrixrtc.livekit.connection import (
    ConnectionState,
    LiveKitConnection,
    MediaOptions,
    RoomConnection,
)
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.media.frames import FrameTap, TapFrame
from matrixrtc.media.published import PublishedTrack
from matrixrtc.media.sources import SyntheticVideoTrack
from matrixrtc.media_transport.aiortc_engine import AiortcConnection
from matrixrtc.media_transport.sfu import LiveKitMedia
from matrixrtc.model import LivekitTransport
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.switching import MediaSwitcher, SwitchConfig

pytestmark = pytest.mark.integration

SDK = MediaOptions(width=160, height=120, fps=15.0)
OURS = MediaOptions(width=160, height=120, fps=15.0, engine="aiortc", render_max=1)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sfu(synapse: Synapse, livekit: LiveKit, run_dir: Path) -> AsyncIterator[AuthService]:
    async with AuthService(run_dir, livekit, synapse, name="lk-sfu-aiortc-engine") as svc:
        yield svc


async def _join(
    stack: contextlib.AsyncExitStack,
    synapse: Synapse,
    user: UserCreds,
    room_id: str,
    sfu_url: str,
    media: MediaOptions,
    frames: FrameTap[tuple[Participant, MediaKind]] | None = None,
) -> tuple[CallAgent, MediaSwitcher]:
    hs = await stack.enter_async_context(
        Homeserver(synapse.base_url, Login(user.user_id, password=user.password))
    )
    transports = (LivekitTransport(livekit_service_url=sfu_url),)
    agent = await stack.enter_async_context(
        CallAgent(hs, room_id, AgentConfig(transports=transports))
    )
    keys = await stack.enter_async_context(CallKeys(agent, CallKeysConfig()))
    switcher = await stack.enter_async_context(
        MediaSwitcher(agent, keys, SwitchConfig(media=media), frames=frames)
    )
    return agent, switcher


def _connection(switcher: MediaSwitcher) -> RoomConnection:
    running = switcher.running(MediaKind.SFU)
    assert isinstance(running, LiveKitMedia)
    assert running.lk is not None
    (conn,) = running.lk.connections.values()
    return conn


async def test_two_aiortc_members_and_an_sdk_member_exchange_e2ee_media(
    synapse: Synapse, sfu: AuthService
) -> None:
    tag = secrets.token_hex(2)
    users = [await synapse.register(f"ae{n}-{tag}") for n in "abc"]
    room_id = await synapse.create_call_room(users[0], invite=users[1:], encrypted=True)
    tapped: Counter[tuple[str, str]] = Counter()  # (sender user, kind) -> frames
    sizes: set[tuple[int, int]] = set()

    def on_frame(key: tuple[Participant, MediaKind], frame: TapFrame) -> None:
        sender, carrier = key
        assert carrier is MediaKind.SFU
        if isinstance(frame, av.VideoFrame):
            tapped[sender.user_id, "video"] += 1
            sizes.add((frame.width, frame.height))
        elif isinstance(frame, av.AudioFrame):
            tapped[sender.user_id, "audio"] += 1

    async with contextlib.AsyncExitStack() as stack:
        members = [
            await _join(
                stack, synapse, u, room_id, sfu.url, m, FrameTap(on_frame) if i == 0 else None
            )
            for i, (u, m) in enumerate(zip(users, (OURS, OURS, SDK), strict=True))
        ]
        async with asyncio.timeout(20):
            await asyncio.gather(*(s.wait_settled(MediaKind.SFU, 20) for _, s in members))
            conns = [_connection(s) for _, s in members]
            idents = [c.identity for c in conns]  # each member's LiveKit identity
            # every member decrypted >= 15 video frames of every other
            while any(
                (st := c.stats.get(idents[j])) is None or st.video_frames < 15
                for i, c in enumerate(conns)
                for j in range(3)
                if i != j
            ):
                assert all(c.state is ConnectionState.CONNECTED for c in conns)
                await asyncio.sleep(0.1)
        assert isinstance(conns[0], AiortcConnection)
        assert isinstance(conns[1], AiortcConnection)
        assert isinstance(conns[2], LiveKitConnection)
        # From here on every key is in: no frame may fail to decrypt.
        start = time.monotonic()
        before = {
            (i, j): (c.stats[idents[j]].decrypt_failures, c.stats[idents[j]].video_frames)
            for i, c in enumerate(conns)
            for j in range(3)
            if i != j
        }
        await asyncio.sleep(2.0)
        for (i, j), (failures, frames) in before.items():
            st = conns[i].stats[idents[j]]
            print(f"{i} <- {j}: {st.video_frames - frames} frames, failures {st.decrypt_failures}")
            assert st.video_frames - frames >= 15, (i, j, st)
            if isinstance(conns[i], AiortcConnection):
                assert st.decrypt_failures == failures, (i, j, st)
            else:
                assert st.failures_after(start) == [], (i, j, st)
        # The tap (member 0, an aiortc member rendering one video): decoded audio of both
        # others, decoded video of exactly one, at the published size.
        others = [u.user_id for u in users[1:]]
        print("tapped:", dict(tapped))
        assert all(tapped[u, "audio"] >= 50 for u in others), tapped
        shown = [u for u in others if tapped[u, "video"] > 0]
        assert len(shown) == 1, tapped
        assert tapped[shown[0], "video"] >= 15, tapped
        assert sizes == {(160, 120)}
        ours = conns[0].stats
        assert ours[idents[1]].layer == ours[idents[2]].layer == "default"
        assert {ours[idents[j]].rendered for j in (1, 2)} == {True, False}
        assert ours[idents[1 + others.index(shown[0])]].video_size == (160, 120)


async def test_aiortc_member_counts_each_frame_at_its_arrival_and_its_decoded_frames(
    synapse: Synapse, sfu: AuthService
) -> None:
    """A participant's video frames are stamped with their arrival (what the switcher's and
    bench/switch's gaps are measured from), not with the 50 ms fold into its counters; the
    rendered track counts its decoded frames."""
    tag = secrets.token_hex(2)
    users = [await synapse.register(f"ad{n}-{tag}") for n in "ab"]
    room_id = await synapse.create_call_room(users[0], invite=users[1:], encrypted=True)
    async with contextlib.AsyncExitStack() as stack:
        members = [await _join(stack, synapse, u, room_id, sfu.url, OURS) for u in users]
        async with asyncio.timeout(20):
            await asyncio.gather(*(s.wait_settled(MediaKind.SFU, 20) for _, s in members))
            conn = _connection(members[0][1])
            assert isinstance(conn, AiortcConnection)
            ident = _connection(members[1][1]).identity
            while (st := conn.stats.get(ident)) is None or st.video_frames < 15:
                assert conn.state is ConnectionState.CONNECTED
                await asyncio.sleep(0.1)
        (track,) = [t for t in conn._tracks.values() if t.received.kind == "video"]
        arrivals = set(track.stats.received_times(256))
        assert set(list(st.video_times)[-10:]) <= arrivals
        assert st.last_video_at in arrivals
        assert track.stats.frames_decoded >= 10


async def test_aiortc_member_stops_the_tracks_it_was_given_when_it_closes(
    synapse: Synapse, sfu: AuthService
) -> None:
    """``TransportContext.sources`` hands each transport its own tracks, and the transport
    stops them on close: an aiortc connection that did not stayed subscribed to the call's
    published track after its call ended (a subscriber per switch, each queueing frames)."""
    tag = secrets.token_hex(2)
    users = [await synapse.register(f"ag{n}-{tag}") for n in "ab"]
    room_id = await synapse.create_call_room(users[0], invite=users[1:], encrypted=True)
    published = PublishedTrack("video")
    published.set_source(SyntheticVideoTrack(160, 120, 15.0))
    try:
        async with contextlib.AsyncExitStack() as stack:
            hs = await stack.enter_async_context(
                Homeserver(synapse.base_url, Login(users[0].user_id, password=users[0].password))
            )
            agent = await stack.enter_async_context(
                CallAgent(
                    hs,
                    room_id,
                    AgentConfig(transports=(LivekitTransport(livekit_service_url=sfu.url),)),
                )
            )
            keys = await stack.enter_async_context(CallKeys(agent, CallKeysConfig()))
            cfg = SwitchConfig(media=OURS, sources=lambda: [published.subscribe()])
            switcher = await stack.enter_async_context(MediaSwitcher(agent, keys, cfg))
            other = await _join(stack, synapse, users[1], room_id, sfu.url, OURS)
            async with asyncio.timeout(20):
                await asyncio.gather(
                    switcher.wait_settled(MediaKind.SFU, 20),
                    other[1].wait_settled(MediaKind.SFU, 20),
                )
                conn = _connection(other[1])
                ident = _connection(switcher).identity
                # what the peer sees is the published track
                while (st := conn.stats.get(ident)) is None or st.video_frames < 15:
                    assert conn.state is ConnectionState.CONNECTED
                    await asyncio.sleep(0.1)
            assert published.subscribers == 1
        assert published.subscribers == 0
    finally:
        await published.aclose()
