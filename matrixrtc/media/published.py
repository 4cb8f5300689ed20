"""Local media a call publishes: one swappable source per kind, fanned out to every transport.

A :class:`PublishedTrack` reads the track the application publishes (any aiortc
``MediaStreamTrack`` producing ``av`` frames: a file player, a camera, a synthetic source) in
one owned task and hands each frame to every subscriber track it made. Each transport instance
gets its own subscriber (a mesh's shared encoder, a LiveKit connection's capture pump), so a
make-before-break switch, where two transports run at once, does not split the frames between
them, and publishing another source (or none) never touches a running transport.

Frames are restamped on the way through, so a source swap never makes time run backwards for
an encoder: video ``pts`` counts 90 kHz ticks of the loop clock since the first frame, audio
``pts`` counts samples. Without a source, subscribers simply get no frames. A subscriber that
falls behind loses its oldest frames (``queue_frames``), never the newest.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
from collections.abc import Callable
from typing import Final

import av
import structlog
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from matrixrtc.tasks import OwnedTasks, first_of

__all__ = ["PublishedTrack"]

log = structlog.get_logger(__name__)

_VIDEO_TIME_BASE: Final = fractions.Fraction(1, 90_000)
_KINDS: Final = ("audio", "video")


class _Subscriber(MediaStreamTrack):
    """What one transport reads: the frames of whatever the call publishes in this kind."""

    def __init__(self, hub: PublishedTrack, queue_frames: int) -> None:
        super().__init__()
        self.kind = hub.kind
        self._hub = hub
        self._publishing_listeners: list[Callable[[], None]] = []
        self._queue: asyncio.Queue[av.VideoFrame | av.AudioFrame | None] = asyncio.Queue(
            maxsize=queue_frames
        )

    @property
    def publishing(self) -> bool:
        """Whether the call publishes a source in this kind now (a transport announces a kind
        that is not published as muted: MSC3291 ``audio_muted``/``video_muted``)."""
        return self._hub.source is not None

    def on_publishing_changed(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever :attr:`publishing` flips (until this track stops)."""
        self._publishing_listeners.append(listener)

    def _publishing_changed(self) -> None:
        for listener in list(self._publishing_listeners):
            try:
                listener()
            except Exception:  # the listener's fault: the others still hear of it
                log.error("media.publishing_listener_failed", exc_info=True)

    def _offer(self, frame: av.VideoFrame | av.AudioFrame | None) -> None:
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()  # the oldest goes; a live call wants the newest
        self._queue.put_nowait(frame)

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            raise MediaStreamError
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            self._hub._unsubscribe(self)
            self._offer(None)  # wakes a pending recv()
        super().stop()


class PublishedTrack:
    """One kind (``"audio"`` or ``"video"``) of what a call publishes; see the module doc."""

    def __init__(self, kind: str, *, queue_frames: int = 4) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be audio or video, not {kind!r}")
        self.kind = kind
        self.frames = 0  # frames handed on (restamped) since creation
        self._queue_frames = queue_frames
        self._source: MediaStreamTrack | None = None
        self._source_changed = asyncio.Event()
        self._subscribers: list[_Subscriber] = []
        self._tasks = OwnedTasks(f"published {kind}", log, event_prefix="media.published")
        self._pumping = False
        self._t0: float | None = None
        self._last_pts = -1
        self._samples = 0

    @property
    def source(self) -> MediaStreamTrack | None:
        return self._source

    def set_source(self, track: MediaStreamTrack | None) -> None:
        """Publish ``track`` from now on (None: publish nothing). The caller keeps owning the
        track: it is not stopped here, nor when the call ends."""
        if track is not None and track.kind != self.kind:
            raise ValueError(f"a {track.kind} track cannot be published as {self.kind}")
        flipped = (track is None) != (self._source is None)
        self._source = track
        self._source_changed.set()
        if flipped:
            for sub in list(self._subscribers):
                sub._publishing_changed()
        if not self._pumping:
            self._pumping = True
            self._tasks.spawn(self._pump(), "pump")

    def subscribe(self) -> MediaStreamTrack:
        """A new track carrying what is published; stopping it unsubscribes."""
        sub = _Subscriber(self, self._queue_frames)
        self._subscribers.append(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _unsubscribe(self, sub: _Subscriber) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    async def aclose(self) -> None:
        """Stop reading the source and end every subscriber track; raise if the pump had
        failed (logged when it did)."""
        try:
            await self._tasks.aclose()
        finally:
            for sub in list(self._subscribers):
                sub.stop()

    async def _pump(self) -> None:
        while True:
            source = self._source
            if source is None:
                self._source_changed.clear()
                await self._source_changed.wait()
                continue
            self._source_changed.clear()
            which, ended = await first_of(frame=source.recv(), changed=self._source_changed.wait())
            if which != "frame" or self._source is not source:
                continue  # another source was published meanwhile: its frames only
            try:
                frame = ended.result()
            except MediaStreamError:
                log.info("media.published_source_ended", kind=self.kind)
                if self._source is source:
                    self.set_source(None)
                continue
            if isinstance(frame, av.VideoFrame | av.AudioFrame):
                self._hand_on(frame)

    def _hand_on(self, frame: av.VideoFrame | av.AudioFrame) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(frame, av.VideoFrame):
            now = loop.time()
            if self._t0 is None:
                self._t0 = now
            pts = max(self._last_pts + 1, round((now - self._t0) * 90_000))
            self._last_pts = pts
            frame.pts = pts
            frame.time_base = _VIDEO_TIME_BASE
        else:
            frame.pts = self._samples
            frame.time_base = fractions.Fraction(1, frame.sample_rate)
            self._samples += frame.samples
        self.frames += 1
        for sub in list(self._subscribers):
            sub._offer(frame)
