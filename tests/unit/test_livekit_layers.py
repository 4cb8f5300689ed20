"""The simulcast layer a LiveKit receiver asks for: the full size up to ``low_layer_above``
remote videos, the low layer past it (and back), asked once per change; never without it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from livekit import rtc

from matrixrtc.livekit.connection import MediaOptions, ParticipantStats
from matrixrtc.livekit.receive import ReceivedTracks


class _Pub:
    def __init__(self) -> None:
        self.kind = rtc.TrackKind.KIND_VIDEO
        self.subscribed = True
        self.simulcasted = True
        self.asked: list[int] = []

    def set_video_quality(self, quality: int) -> None:
        self.asked.append(quality)


def _conn(n: int, limit: int | None) -> tuple[Any, dict[str, _Pub]]:
    pubs = {f"p{i}": _Pub() for i in range(n)}
    room = SimpleNamespace(
        remote_participants={
            k: SimpleNamespace(identity=k, track_publications={"v": p}) for k, p in pubs.items()
        }
    )
    stats: dict[str, ParticipantStats] = {}
    conn: Any = ReceivedTracks(
        room,  # type: ignore[arg-type]
        MediaOptions(low_layer_above=limit),
        e2ee=True,
        clock=lambda: 0.0,
        stats_for=lambda ident: stats.setdefault(ident, ParticipantStats(ident)),
        spawn=lambda *_: None,
        cryptor_enabled=lambda _: None,
    )
    conn.stats = stats
    return conn, pubs


LOW, HIGH = rtc.VideoQuality.VIDEO_QUALITY_LOW, rtc.VideoQuality.VIDEO_QUALITY_HIGH


def test_full_size_up_to_the_limit_then_low_for_all() -> None:
    conn, pubs = _conn(4, limit=4)
    conn.choose_layers()
    assert all(p.asked == [HIGH] for p in pubs.values())
    assert {s.layer for s in conn.stats.values()} == {"high"}
    extra = _Pub()
    conn.room.remote_participants["p4"] = SimpleNamespace(
        identity="p4", track_publications={"v": extra}
    )
    conn.choose_layers()
    assert all(p.asked == [HIGH, LOW] for p in pubs.values())
    assert extra.asked == [LOW]
    conn.choose_layers()  # no change: nothing asked again
    assert extra.asked == [LOW]
    assert conn.stats["p4"].layer == "low"


def test_a_single_layer_publication_is_never_asked() -> None:
    """set_video_quality raises on it (livekit 1.2.1), in the SDK's event callback."""
    conn, pubs = _conn(6, limit=4)
    pubs["p0"].simulcasted = False
    conn.choose_layers()
    assert pubs["p0"].asked == []
    assert conn.stats["p0"].layer == "single"
    assert pubs["p1"].asked == [LOW]


def test_no_limit_asks_nothing() -> None:
    conn, pubs = _conn(12, limit=None)
    conn.choose_layers()
    assert all(p.asked == [] for p in pubs.values())
    assert conn.stats == {}
