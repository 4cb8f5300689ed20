"""``MediaTransport.carries`` judges a peer by what it actually publishes (the switch settles on
it): the SFU transport against fake LiveKit connections, the mesh against a fake engine link.
No network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from matrixrtc.agent import Participant
from matrixrtc.livekit.connection import LiveKitConnection, MediaOptions, ParticipantStats
from matrixrtc.media.sinks import ReceiveStats
from matrixrtc.media_transport.aiortc_engine import AiortcConnection
from matrixrtc.media_transport.mesh import MeshMedia
from matrixrtc.media_transport.sfu import (
    AUDIO_ONLY_GRACE_S,
    NOTHING_ANNOUNCED_GRACE_S,
    LiveKitMedia,
)

PEER = cast(Participant, type("P", (), {"rtc_backend_identity": "bob", "user_id": "@b:x",
                                        "device_id": "B"})())  # fmt: skip
SINCE = 100.0


@dataclass
class FakeConn:
    kinds: frozenset[str] | None = None
    stats: dict[str, ParticipantStats] = field(default_factory=dict)
    failing: bool = False
    seen_at: dict[str, float] = field(default_factory=dict)
    engine: str = "sdk"

    def published_kinds(self, identity: str) -> frozenset[str] | None:
        return self.kinds

    def decrypting(self, identity: str) -> bool:
        return not self.failing


def sfu(conn: FakeConn, now: float = SINCE + 60) -> LiveKitMedia:
    media = LiveKitMedia(cast(Any, type("Ctx", (), {"clock": staticmethod(lambda: now)})()))
    media.lk = cast(Any, type("LK", (), {"connections": {"t": conn}})())
    return media


def test_sfu_video_peer_needs_video_since_the_switch() -> None:
    conn = FakeConn(frozenset({"audio", "video"}), {"bob": ParticipantStats("bob")})
    s = conn.stats["bob"]
    s.first_audio_at, s.last_audio_at = SINCE, SINCE + 5  # audio alone is not enough
    assert not sfu(conn).carries(PEER, SINCE, video=True)
    s.last_video_at = SINCE - 1  # a frame from before the switch does not count
    assert not sfu(conn).carries(PEER, SINCE, video=True)
    s.last_video_at = SINCE + 0.1
    assert sfu(conn).carries(PEER, SINCE, video=True)


def test_sfu_audio_only_peer_counts_once_heard_for_the_grace() -> None:
    conn = FakeConn(frozenset({"audio"}), {"bob": ParticipantStats("bob")})
    s = conn.stats["bob"]
    assert not sfu(conn).carries(PEER, SINCE, video=True)  # nothing heard yet
    s.first_audio_at, s.last_audio_at = SINCE - 3, SINCE + AUDIO_ONLY_GRACE_S / 2
    assert not sfu(conn).carries(PEER, SINCE, video=True)  # its video may still be announced
    assert sfu(conn).carries(PEER, SINCE, video=False)  # an audio call needs no grace
    s.last_audio_at = SINCE + AUDIO_ONLY_GRACE_S
    assert sfu(conn).carries(PEER, SINCE, video=True)
    conn.failing = True  # concealment while nothing decrypts is not media reaching us
    assert not sfu(conn).carries(PEER, SINCE, video=True)


def test_sfu_peer_absent_is_waited_for() -> None:
    assert not sfu(FakeConn(None)).carries(PEER, SINCE, video=True)
    assert not sfu(FakeConn(None, seen_at={"bob": SINCE})).carries(PEER, SINCE, video=True)


def test_sfu_peer_announcing_nothing_counts_after_a_moment_in_the_room() -> None:
    """Nothing announced looks like "about to publish" for a moment, then like "publishes
    nothing": it no longer holds the switch up until settle_timeout_s."""
    quiet = FakeConn(frozenset(), seen_at={"bob": SINCE + 2})
    grace = NOTHING_ANNOUNCED_GRACE_S
    assert not sfu(quiet, now=SINCE + 2).carries(PEER, SINCE, video=True)  # just seen
    assert not sfu(quiet, now=SINCE + 2 + grace / 2).carries(PEER, SINCE, video=True)
    assert sfu(quiet, now=SINCE + 2 + grace).carries(PEER, SINCE, video=True)
    assert sfu(quiet, now=SINCE + 2 + grace).carries(PEER, SINCE, video=False)
    # Seen long before the switch: the quiet moment counts from the switch.
    old = FakeConn(frozenset(), seen_at={"bob": SINCE - 30})
    assert not sfu(old, now=SINCE + grace / 2).carries(PEER, SINCE, video=True)
    assert sfu(old, now=SINCE + grace).carries(PEER, SINCE, video=True)
    # Never seen joining on this connection (no time to count from): waited for.
    assert not sfu(FakeConn(frozenset())).carries(PEER, SINCE, video=True)
    # Announcing anything, the peer is judged by it (here: video never arrived).
    video = FakeConn(frozenset({"video"}), seen_at={"bob": SINCE - 30})
    assert not sfu(video).carries(PEER, SINCE, video=True)


@dataclass
class FakeLink:
    remote_kinds: set[str]
    stats: dict[str, ReceiveStats]
    connected_at: float | None = None
    peer: object = None


def mesh(link: FakeLink, muted: frozenset[str] = frozenset()) -> MeshMedia:
    engine = type(
        "E", (), {"link_for": lambda self, p: link, "remote_muted": lambda self, p: muted}
    )()
    media = MeshMedia(cast(Any, None))
    media.link = cast(Any, type("L", (), {"engine": engine})())
    return media


def test_mesh_judges_by_the_tracks_the_peer_sends_minus_its_muted_kinds() -> None:
    video, audio = ReceiveStats(kind="video"), ReceiveStats(kind="audio")
    link = FakeLink({"audio", "video"}, {"video": video, "audio": audio}, connected_at=SINCE)
    audio.frame_received(SINCE + 1, 100)  # received and decrypted: audio is not decoded
    assert not mesh(link).carries(PEER, SINCE, video=True)  # sends video: wait for it
    assert mesh(link, frozenset({"video"})).carries(PEER, SINCE, video=True)  # muted: audio
    video.last_frame_at = SINCE + 1
    assert mesh(link).carries(PEER, SINCE, video=True)
    silent = FakeLink(set(), {}, connected_at=None)
    assert not mesh(silent).carries(PEER, SINCE, video=True)
    silent.connected_at = SINCE  # sends nothing at all: carried once connected
    assert mesh(silent).carries(PEER, SINCE, video=True)


def test_each_transport_names_the_engine_that_runs_it() -> None:
    """``engine`` (what ``Call.media_engine`` reports): the SFU's is its connections' client,
    the configured one before any connection; the mesh's is the mesh."""
    assert sfu(FakeConn(engine="aiortc")).engine == "aiortc"
    assert sfu(FakeConn(engine="sdk")).engine == "sdk"
    ctx = cast(Any, type("Ctx", (), {"media": MediaOptions(engine="aiortc")})())
    assert LiveKitMedia(ctx).engine == "aiortc"  # not started: no connection yet
    assert LiveKitConnection.engine == "sdk"
    assert AiortcConnection.engine == "aiortc"
    assert MeshMedia(cast(Any, None)).engine == "mesh"


def test_mesh_judges_audio_at_decryption_and_video_at_decoding() -> None:
    """Remote audio is decoded only for a frames tap, so a peer that sends only audio (or
    whose video is muted) is carried once its audio decrypts; video still waits for a
    decoded frame."""
    video, audio = ReceiveStats(kind="video"), ReceiveStats(kind="audio")
    link = FakeLink({"audio"}, {"audio": audio}, connected_at=SINCE)
    assert not mesh(link).carries(PEER, SINCE, video=False)
    audio.frame_received(SINCE - 1, 100)  # before the switch began: not yet
    assert not mesh(link).carries(PEER, SINCE, video=False)
    audio.frame_received(SINCE + 1, 100)
    assert audio.frames_decoded == 0
    assert mesh(link).carries(PEER, SINCE, video=False)
    both = FakeLink({"audio", "video"}, {"video": video, "audio": audio}, connected_at=SINCE)
    video.frame_received(SINCE + 1, 1000)  # decrypted but not yet decoded
    assert not mesh(both).carries(PEER, SINCE, video=True)
    video.frame_decoded(SINCE + 2)
    assert mesh(both).carries(PEER, SINCE, video=True)
