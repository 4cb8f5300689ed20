"""Decoded remote frames, as transports hand them to whoever listens.

A transport that receives media calls a :class:`FrameTap` with each decoded frame and the peer
it came from, in the transport's own terms (a mesh peer's device, a LiveKit identity). Turning
a frame into an ``av`` frame can cost a copy (LiveKit's are not ``av`` frames), so a transport
asks :attr:`FrameTap.listening` first and skips the work while nobody listens.

A transport that sees the *encoded* frames after decryption (the mesh: between aiortc's jitter
buffer and its decoder) also hands those on as :class:`EncodedFrame` while
:attr:`FrameTap.listening_encoded` says someone wants them (a recorder writing the received
codec without re-encoding it). LiveKit's Python SDK exposes no received encoded frames, so the
SFU transport never does.
"""

from __future__ import annotations

import fractions
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeAlias, TypeVar

import av

__all__ = ["SAMPLE_CLOCK", "AvFrame", "EncodedFrame", "FrameTap", "TapFrame", "vp8_frame_size"]

AvFrame: TypeAlias = av.VideoFrame | av.AudioFrame
K = TypeVar("K")


class _SampleClock:
    def __repr__(self) -> str:
        return "SAMPLE_CLOCK"


SAMPLE_CLOCK: Final = _SampleClock()
"""``frame.opaque`` of an audio frame whose ``pts`` counts the samples its *receiver* handed out
(LiveKit's audio has no timestamp), not its sender's clock: that count runs ahead when the
receiver stretches audio and behind when it drops some; the recorder corrects for both."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedFrame:
    """One received, decrypted, still encoded frame (a whole VP8 frame, one Opus packet).

    ``pts`` counts ``time_base`` units on the sender's RTP clock (as aiortc's decoded frames
    do), so ``time`` places it exactly like the decoded frame it becomes.
    ``request_keyframe`` asks the sender for a key frame (a PLI); thread-safe."""

    kind: str  # "audio" | "video"
    codec: str  # lower-case codec name: "vp8", "opus"…
    data: bytes
    pts: int
    time_base: fractions.Fraction
    keyframe: bool
    request_keyframe: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    @property
    def time(self) -> float:
        return float(self.pts * self.time_base)


TapFrame: TypeAlias = AvFrame | EncodedFrame


def vp8_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a VP8 key frame's header (RFC 6386 §9.1), None for other frames."""
    if len(data) < 10 or data[0] & 0x01 or data[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(data[6:8], "little") & 0x3FFF
    height = int.from_bytes(data[8:10], "little") & 0x3FFF
    return (width, height) if width and height else None


class FrameTap(Generic[K]):
    """``tap(peer, frame)`` hands one frame on; ``listening`` says whether to bother with
    decoded frames, ``listening_encoded`` whether to hand on encoded ones too."""

    def __init__(
        self,
        handler: Callable[[K, TapFrame], None],
        listening: Callable[[], bool] = lambda: True,
        listening_encoded: Callable[[], bool] = lambda: False,
    ) -> None:
        self._handler = handler
        self._listening = listening
        self._listening_encoded = listening_encoded

    @property
    def listening(self) -> bool:
        return self._listening()

    @property
    def listening_encoded(self) -> bool:
        return self._listening_encoded()

    def __call__(self, peer: K, frame: TapFrame) -> None:
        self._handler(peer, frame)
