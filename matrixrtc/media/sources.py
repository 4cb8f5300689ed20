"""Synthetic local media: a moving video pattern and an audio tone, paced in real time.

Both are aiortc ``MediaStreamTrack`` s producing raw ``av`` frames with ``pts``/``time_base``
set (90 kHz for video, 48 kHz for audio, as RTP uses), so they can feed aiortc's own encoders
or the mesh's shared encoder. Pacing uses the event loop clock; a slow consumer makes frames
late, never piles them up.
"""

from __future__ import annotations

import asyncio
import fractions
import functools
import math
from typing import Final

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

__all__ = [
    "AUDIO_RATE",
    "AUDIO_TIME_BASE",
    "VIDEO_CLOCK",
    "VIDEO_TIME_BASE",
    "ScaledFeed",
    "SyntheticVideoTrack",
    "ToneAudioTrack",
]

VIDEO_CLOCK: Final = 90_000
VIDEO_TIME_BASE: Final = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_RATE: Final = 48_000
AUDIO_TIME_BASE: Final = fractions.Fraction(1, AUDIO_RATE)
AUDIO_PTIME: Final = 0.020


class _Pacer:
    """Releases frame n at start + n * interval on the loop clock."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.count = 0
        self._start: float | None = None

    async def next(self) -> int:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self.count * self.interval
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        n = self.count
        self.count += 1
        return n


@functools.lru_cache(maxsize=8)
def _pattern(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Y, U and V planes of the synthetic picture: made once per size (a few ms of numpy
    each time, on the event loop, when a transport starts during a switch), never written."""
    ys, xs = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 24, size=(height, width))
    y = (((xs + ys) * 2 + noise) % 256).astype(np.uint8)
    u = ((xs * 255) // max(1, width - 1)).astype(np.uint8)[::2, ::2]
    v = ((ys * 255) // max(1, height - 1)).astype(np.uint8)[::2, ::2]
    for plane in (y, u, v):
        plane.flags.writeable = False  # shared by every track of this size
    return y, u, v


class SyntheticVideoTrack(MediaStreamTrack):
    """A moving colour pattern at ``width``×``height`` and ``fps`` (default 320×240 @ 15).

    The pattern is a precomputed image rolled a few pixels per frame: cheap to make, and it
    keeps the encoder busy like real motion does (a static image would cost almost nothing).
    """

    kind = "video"

    def __init__(self, width: int = 320, height: int = 240, fps: float = 15.0) -> None:
        super().__init__()
        if width <= 0 or height <= 0 or width % 2 or height % 4 or fps <= 0:
            raise ValueError("width must be even, height a multiple of 4, fps positive")
        self.width = width
        self.height = height
        self.fps = fps
        self.frames_produced = 0
        self._pacer = _Pacer(1.0 / fps)
        self._planes = _pattern(width, height)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        return self.frame_at(await self._pacer.next())

    @property
    def period(self) -> int:
        """The pattern repeats every this many frames (it moves 4 pixels a frame)."""
        return self.width // math.gcd(self.width, 4)

    def frame_at(self, n: int) -> av.VideoFrame:
        """Frame ``n`` of the pattern (no pacing; ``recv`` paces these)."""
        y, u, v = self._planes
        shift = (n * 4) % self.width
        # yuv420p as one (h * 3 / 2, w) array: Y, then U and V each folded to h / 4 rows.
        stacked = np.concatenate(
            (
                np.roll(y, shift, axis=1),
                u.reshape(self.height // 4, self.width),
                v.reshape(self.height // 4, self.width),
            )
        )
        frame = av.VideoFrame.from_ndarray(stacked, format="yuv420p")
        frame.pts = round(n * VIDEO_CLOCK / self.fps)
        frame.time_base = VIDEO_TIME_BASE
        self.frames_produced += 1
        return frame


class ToneAudioTrack(MediaStreamTrack):
    """A sine tone (default 440 Hz), 48 kHz mono s16, in 20 ms frames."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0, amplitude: float = 0.25) -> None:
        super().__init__()
        self.frequency = frequency
        self.amplitude = amplitude
        self.frames_produced = 0
        self._samples = round(AUDIO_RATE * AUDIO_PTIME)
        self._pacer = _Pacer(AUDIO_PTIME)
        # A whole number of hertz repeats every second: those frames are made once (a sine
        # per 20 ms frame was ~2 % of a call-test participant's CPU at 12 members).
        self._period = round(1 / AUDIO_PTIME) if float(frequency).is_integer() else None
        self._cache: dict[int, np.ndarray] = {}

    def _pcm(self, n: int) -> np.ndarray:
        """Frame ``n``'s samples, (1, samples) s16."""
        key = n % self._period if self._period is not None else None
        if key is not None and (cached := self._cache.get(key)) is not None:
            return cached
        start = n * self._samples
        t = (np.arange(start, start + self._samples) / AUDIO_RATE) * (2 * math.pi * self.frequency)
        pcm = (np.sin(t) * self.amplitude * 32767).astype(np.int16).reshape(1, -1)
        if key is not None:
            pcm.flags.writeable = False
            self._cache[key] = pcm
        return pcm

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n = await self._pacer.next()
        start = n * self._samples
        frame = av.AudioFrame.from_ndarray(self._pcm(n), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        frame.time_base = AUDIO_TIME_BASE
        self.frames_produced += 1
        return frame


class ScaledFeed(MediaStreamTrack):
    """Video frames handed in by another reader of a source (:meth:`feed`), scaled to
    ``width`` × ``height`` as they are read: the source of a lower simulcast layer, fed by
    the full layer's encoder (``SharedEncoder.tee``) so the camera is read once.

    Holds at most ``maxsize`` frames: a reader that falls behind loses the oldest (a live
    layer wants the newest frame, not a backlog)."""

    kind = "video"

    def __init__(self, width: int, height: int, maxsize: int = 2) -> None:
        super().__init__()
        self.width = width
        self.height = height
        self.dropped = 0
        self._queue: asyncio.Queue[av.VideoFrame | None] = asyncio.Queue(maxsize)

    def feed(self, frame: av.VideoFrame | av.AudioFrame) -> None:
        if not isinstance(frame, av.VideoFrame) or self.readyState != "live":
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(frame)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            raise MediaStreamError
        if frame.width == self.width and frame.height == self.height:
            return frame
        return frame.reformat(width=self.width, height=self.height, format="yuv420p")

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(None)
