"""Decoded remote frames, as transports hand them to whoever listens.

A transport that receives media calls a :class:`FrameTap` with each decoded frame and the peer
it came from, in the transport's own terms (a mesh peer's device, a LiveKit identity). Turning
a frame into an ``av`` frame can cost a copy (LiveKit's are not ``av`` frames), so a transport
asks :attr:`FrameTap.listening` first and skips the work while nobody listens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeAlias, TypeVar

import av

__all__ = ["AvFrame", "FrameTap"]

AvFrame: TypeAlias = av.VideoFrame | av.AudioFrame
K = TypeVar("K")


class FrameTap(Generic[K]):
    """``tap(peer, frame)`` hands one decoded frame on; ``listening`` says whether to bother."""

    def __init__(
        self,
        handler: Callable[[K, AvFrame], None],
        listening: Callable[[], bool] = lambda: True,
    ) -> None:
        self._handler = handler
        self._listening = listening

    @property
    def listening(self) -> bool:
        return self._listening()

    def __call__(self, peer: K, frame: AvFrame) -> None:
        self._handler(peer, frame)
