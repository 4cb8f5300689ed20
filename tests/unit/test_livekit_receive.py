"""Received LiveKit tracks: the first ``render_max`` remote videos are rendered (frames into
the process), the rest counted from the receiver's statistics; a counted track's decoded
frames become the sender's counters."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

from livekit import rtc

from matrixrtc.livekit import receive
from matrixrtc.livekit.connection import MediaOptions, ParticipantStats
from matrixrtc.livekit.receive import ReceivedTracks


def _tracks(
    render_max: int | None,
) -> tuple[ReceivedTracks, dict[str, ParticipantStats], list[str]]:
    stats: dict[str, ParticipantStats] = {}
    spawned: list[str] = []

    def spawn(sid: str, identity: str, coro: Coroutine[Any, Any, None], name: str) -> None:
        spawned.append(getattr(coro, "__qualname__", "").rsplit(".", 1)[-1])
        coro.close()

    room: Any = SimpleNamespace(remote_participants={})
    ticks = iter(range(1, 1_000_000))
    rx = ReceivedTracks(
        room,
        MediaOptions(render_max=render_max),
        e2ee=True,
        clock=lambda: float(next(ticks)),
        stats_for=lambda ident: stats.setdefault(ident, ParticipantStats(ident)),
        spawn=spawn,
        cryptor_enabled=lambda _: None,
    )
    return rx, stats, spawned


def _subscribe(rx: ReceivedTracks, who: str, kind: int = rtc.TrackKind.KIND_VIDEO) -> None:
    track: Any = SimpleNamespace(kind=kind, sid=f"TR_{who}_{kind}")
    rx.on_subscribed(track, SimpleNamespace(), SimpleNamespace(identity=who))  # type: ignore[arg-type]


def test_first_k_videos_rendered_the_rest_counted_and_a_freed_slot_reused() -> None:
    rx, stats, spawned = _tracks(render_max=2)
    for who in ("a", "b", "c", "d"):
        _subscribe(rx, who)
        _subscribe(rx, who, rtc.TrackKind.KIND_AUDIO)  # audio is never limited
    assert [stats[w].rendered for w in "abcd"] == [True, True, False, False]
    assert spawned.count("_render_video") == 2
    assert spawned.count("_count_video") == 2
    assert spawned.count("_count_audio") == 4
    rx.on_ended("TR_a_2")  # a's video went: its slot is free for the next one
    _subscribe(rx, "e")
    assert stats["e"].rendered is True


def test_no_limit_renders_every_video() -> None:
    rx, stats, spawned = _tracks(render_max=None)
    for who in "abcdef":
        _subscribe(rx, who)
    assert all(s.rendered for s in stats.values())
    assert spawned == ["_render_video"] * 6


class _StatsTrack:
    """A received video track and its subscriber connection's statistics."""

    def __init__(self, sid: str = "TR_a") -> None:
        self.sid = sid
        self.decoded = 0

    def _report(self, sid: str, kind: str = "video") -> Any:
        inbound = SimpleNamespace(
            frames_decoded=self.decoded, frame_width=320, frame_height=240, track_identifier=sid
        )
        rtp = SimpleNamespace(inbound=inbound, stream=SimpleNamespace(kind=kind))
        return SimpleNamespace(WhichOneof=lambda _: "inbound_rtp", inbound_rtp=rtp)

    async def get_rtc_stats(self) -> Any:
        other = SimpleNamespace(WhichOneof=lambda _: "candidate_pair")
        audio = self._report(self.sid, "audio")
        return SimpleNamespace(subscriber_stats=[other, audio, self._report(self.sid)])

    async def get_stats(self) -> list[Any]:
        return [self._report(self.sid)]


async def test_a_counted_track_counts_what_its_receiver_decoded(monkeypatch: Any) -> None:
    monkeypatch.setattr(receive, "COUNT_POLL_S", 0.001)
    rx, _, _ = _tracks(render_max=0)
    stats = ParticipantStats("a")
    track = _StatsTrack()
    rx.room = track  # type: ignore[assignment]
    task = asyncio.create_task(rx._count_video(track, stats))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert stats.video_frames == 0
    assert stats.first_video_at is None
    track.decoded = 15
    await asyncio.sleep(0.01)
    track.decoded = 20
    await asyncio.sleep(0.01)
    task.cancel()
    assert stats.video_frames == 20
    assert len(stats.video_times) == 20
    assert stats.video_size == (320, 240)
    assert stats.first_video_at is not None
    assert stats.last_video_at is not None
    assert stats.last_video_at > stats.first_video_at


async def test_a_track_missing_from_the_connection_report_asks_its_receiver(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(receive, "COUNT_POLL_S", 0.001)
    rx, _, _ = _tracks(render_max=0)
    stats = ParticipantStats("a")
    track = _StatsTrack("TR_x")
    room = _StatsTrack("TR_other")  # the connection's report names another track
    rx.room = room  # type: ignore[assignment]
    task = asyncio.create_task(rx._count_video(track, stats))  # type: ignore[arg-type]
    track.decoded = 9
    await asyncio.sleep(0.01)
    task.cancel()
    assert stats.video_frames == 9
