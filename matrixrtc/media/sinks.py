"""Counting sinks for remote media: they always drain the track and count what arrives.

A sink can also hand every decoded frame to a callback (``on_frame``): how a call's
``frames()`` stream gets the mesh's frames. A failing callback is logged, never stops the sink.

aiortc's ``RemoteStreamTrack`` queue is unbounded, so a remote track nobody reads grows
without limit: every remote track gets a :class:`CountingSink`. :class:`ReceiveStats` is also
updated by the mesh engine's receive hook (encoded frames, bytes, decrypt failures), so one
object describes a remote track from packet to picture.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import structlog
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from matrixrtc.tasks import OwnedTasks

__all__ = ["CountingSink", "ReceiveStats"]

log = structlog.get_logger(__name__)

_FPS_WINDOW_S = 2.0


@dataclass(slots=True)
class ReceiveStats:
    """Counters for one remote track. ``*_at`` are clock seconds (``time.monotonic``)."""

    kind: str
    started_at: float = field(default_factory=time.monotonic)
    encoded_frames: int = 0  # frames that reached the decoder queue (after decryption)
    encoded_bytes: int = 0
    decrypt_failures: int = 0
    frames_decoded: int = 0
    first_frame_at: float | None = None
    last_frame_at: float | None = None
    _recent: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=256))
    # False: this video is received, decrypted and counted but not decoded (not rendered).
    decoding: bool = True
    _recent_received: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=256)
    )

    def frame_received(self, now: float, size: int) -> None:
        """A frame reached the decoder queue, decrypted (decoded next, or not)."""
        self.encoded_frames += 1
        self.encoded_bytes += size
        self._recent_received.append(now)

    def received_times(self, n: int) -> list[float]:
        """When the newest ``n`` frames were received (at most the last 256)."""
        if n <= 0:
            return []
        return list(self._recent_received)[-n:]

    @property
    def last_received_at(self) -> float | None:
        """When the newest frame was received and decrypted (decoded or not)."""
        return self._recent_received[-1] if self._recent_received else None

    def received_fps(self, now: float | None = None) -> float:
        """Frames received (and decrypted) per second over the last two seconds."""
        now = time.monotonic() if now is None else now
        return sum(1 for t in self._recent_received if t > now - _FPS_WINDOW_S) / _FPS_WINDOW_S

    def frame_decoded(self, now: float) -> None:
        self.frames_decoded += 1
        if self.first_frame_at is None:
            self.first_frame_at = now
        self.last_frame_at = now
        self._recent.append(now)

    def decoded_times(self, n: int) -> list[float]:
        """When the newest ``n`` frames were decoded (at most the last 256)."""
        if n <= 0:
            return []
        return list(self._recent)[-n:]

    def fps(self, now: float | None = None) -> float:
        """Decoded frames per second over the last two seconds."""
        now = time.monotonic() if now is None else now
        recent = [t for t in self._recent if t > now - _FPS_WINDOW_S]
        return len(recent) / _FPS_WINDOW_S

    @property
    def first_frame_delay(self) -> float | None:
        return None if self.first_frame_at is None else self.first_frame_at - self.started_at


class CountingSink:
    """Drains one remote track in an owned task and counts decoded frames into ``stats``."""

    def __init__(
        self,
        track: MediaStreamTrack,
        stats: ReceiveStats | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_frame: Callable[[av.VideoFrame | av.AudioFrame], None] | None = None,
    ) -> None:
        self.track = track
        self.stats = stats if stats is not None else ReceiveStats(kind=track.kind)
        self._clock = clock
        self._on_frame = on_frame
        self.callback_failures = 0
        self._tasks = OwnedTasks(f"sink {track.kind} {track.id}", log, event_prefix="media.sink")
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._tasks.spawn(self._run(), "drain")

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                self.stats.frame_decoded(self._clock())
                if self._on_frame is not None and isinstance(frame, av.VideoFrame | av.AudioFrame):
                    self._hand_on(frame)
        except MediaStreamError:
            pass  # the track ended

    def _hand_on(self, frame: av.VideoFrame | av.AudioFrame) -> None:
        assert self._on_frame is not None
        try:
            self._on_frame(frame)
        except Exception as exc:  # the listener's fault: keep draining and counting
            self.callback_failures += 1
            if self.callback_failures == 1 or self.callback_failures % 1000 == 0:
                log.warning("media.frame_callback_failed", error=repr(exc))

    async def aclose(self) -> None:
        """Stop draining; raise if draining had failed (logged when it did)."""
        await self._tasks.aclose()
