"""Frames between ``av`` (what aiortc tracks and the rest of matrixrtc use) and the livekit rtc
SDK's own frame types: I420 video and 16-bit PCM audio, copied plane by plane."""

from __future__ import annotations

import fractions

import av
import numpy as np
from livekit import rtc

from matrixrtc.media.frames import SAMPLE_CLOCK

__all__ = ["AudioToRtc", "JitterDelay", "audio_to_av", "video_to_av", "video_to_rtc"]

_LAYOUTS = {1: "mono", 2: "stereo"}


def _i420_sizes(width: int, height: int) -> tuple[tuple[int, int], ...]:
    cw, ch = (width + 1) // 2, (height + 1) // 2
    return ((width, height), (cw, ch), (cw, ch))


def video_to_rtc(frame: av.VideoFrame) -> rtc.VideoFrame:
    """An ``av`` video frame (any pixel format) as an I420 LiveKit frame."""
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    parts = []
    for plane, (w, h) in zip(frame.planes, _i420_sizes(frame.width, frame.height), strict=True):
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(h, plane.line_size)
        parts.append(rows[:, :w].tobytes())
    return rtc.VideoFrame(frame.width, frame.height, rtc.VideoBufferType.I420, b"".join(parts))


_US = fractions.Fraction(1, 1_000_000)


def video_to_av(frame: rtc.VideoFrame, timestamp_us: int | None = None) -> av.VideoFrame:
    """A LiveKit video frame (any buffer type) as a ``yuv420p`` ``av`` frame.

    ``timestamp_us`` (``VideoFrameEvent.timestamp_us``: libwebrtc's render time of a received
    frame, on the sender's timing, in µs) becomes the frame's ``pts`` in a 1/1 000 000 time
    base, so the recorder places the frame by the sender's timing instead of its arrival
    in this process's event loop. Zero or negative (unknown) leaves the frame unstamped."""
    if frame.type != rtc.VideoBufferType.I420:
        frame = frame.convert(rtc.VideoBufferType.I420)
    out = av.VideoFrame(frame.width, frame.height, "yuv420p")
    data = memoryview(frame.data).cast("B")
    offset = 0
    for plane, (w, h) in zip(out.planes, _i420_sizes(frame.width, frame.height), strict=True):
        src = np.frombuffer(data, np.uint8, count=w * h, offset=offset).reshape(h, w)
        offset += w * h
        padded = np.zeros((h, plane.line_size), np.uint8)
        padded[:, :w] = src
        plane.update(padded.tobytes())
    if timestamp_us is not None and timestamp_us > 0:
        out.pts = timestamp_us
        out.time_base = _US
    return out


def audio_to_av(
    frame: rtc.AudioFrame, sample_index: int | None = None, *, content: bool = False
) -> av.AudioFrame:
    """A LiveKit PCM frame as an ``s16`` ``av`` frame (mono or stereo, interleaved).

    LiveKit's received audio carries no timestamp, but it is continuous: libwebrtc's jitter
    buffer hands out exactly real time (concealment fills losses). ``sample_index`` (the
    samples of this stream before this frame) becomes ``pts`` in a 1/sample-rate time base, so
    the recorder places audio by that count instead of by its arrival, which a busy event
    loop delays and bunches (a stall read as a gap shifted all later audio).

    The count is the *receiver's* clock (``opaque`` = ``SAMPLE_CLOCK``) unless ``content``:
    the caller took the jitter buffer's current delay off it (:class:`JitterDelay`), which
    makes it the content's own time — it follows the jitter buffer stretching and squeezing
    the audio — and the recorder treats it like a sender's timestamp."""
    layout = _LAYOUTS.get(frame.num_channels)
    if layout is None:
        raise ValueError(f"{frame.num_channels} audio channels")
    pcm = np.frombuffer(memoryview(frame.data).cast("B"), np.int16).reshape(1, -1)
    out = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
    out.sample_rate = frame.sample_rate
    if sample_index is not None:
        out.pts = sample_index
        out.time_base = fractions.Fraction(1, frame.sample_rate)
        out.opaque = None if content else SAMPLE_CLOCK
    return out


class JitterDelay:
    """The receiver's jitter-buffer delay now, from its cumulative stats (WebRTC
    ``jitterBufferDelay`` / ``jitterBufferEmittedCount``: their growth between two reads is the
    mean delay of the samples emitted in between). Under load libwebrtc's NetEq builds up
    hundreds of ms of delay and then plays the audio faster to shed it (or slower to build
    it): the content's time is the output sample count minus this delay."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.known = False
        self._last: tuple[float, int] | None = None

    def update(self, total_delay_s: float, emitted: int) -> None:
        if self._last is not None:
            delay, count = total_delay_s - self._last[0], emitted - self._last[1]
            if count > 0 and delay >= 0:
                self.delay_s, self.known = delay / count, True
        self._last = (total_delay_s, emitted)


class AudioToRtc:
    """``av`` audio frames (any format, rate or layout) as LiveKit PCM at one rate and layout."""

    def __init__(self, sample_rate: int = 48_000, channels: int = 1) -> None:
        self.sample_rate = sample_rate
        self.channels = channels
        self._resampler = av.AudioResampler(
            format="s16", layout=_LAYOUTS[channels], rate=sample_rate
        )

    def convert(self, frame: av.AudioFrame) -> list[rtc.AudioFrame]:
        out = []
        for f in self._resampler.resample(frame):
            pcm = f.to_ndarray()
            out.append(rtc.AudioFrame(pcm.tobytes(), self.sample_rate, self.channels, f.samples))
        return out
