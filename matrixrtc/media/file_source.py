"""Media files as call tracks: anything FFmpeg reads (through PyAV), paced in real time.

``MediaFile(path, loop=False, start=0.0)`` checks the file when it is made — it opens, has an
audio or a video stream, and each of them decodes — and raises :class:`MediaFileError` with a
plain reason otherwise, so a bad file is reported before anyone joins a call. Its ``audio`` and
``video`` are aiortc ``MediaStreamTrack`` s (or None when the file has no such stream) for
``Call.publish`` or any aiortc peer connection:

- video: decoded frames as ``yuv420p`` with ``pts`` in 90 kHz ticks of media time;
- audio: 48 kHz ``s16`` (mono, or stereo for multichannel sources) in 20 ms frames, ``pts``
  counting samples.

One thread demuxes and decodes both streams (PyAV releases the GIL while decoding) at most
``lead_s`` ahead of the playback clock. The clock starts when the first frame is handed
out, and each frame is released when its media time is due, so audio and video stay together
and a slow reader gets late frames (counted in :attr:`MediaFile.stats`), never a pile-up.
``start`` skips into the file; ``loop`` plays it again from ``start`` at the end, media time
continuing. Without ``loop`` both tracks end (``MediaStreamError``) after the last frame.
"""

from __future__ import annotations

import asyncio
import fractions
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import av
import av.error
import structlog
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from matrixrtc.errors import LocalError

__all__ = ["FileStats", "MediaFile", "MediaFileError", "MediaInfo", "probe"]

log = structlog.get_logger(__name__)

AUDIO_RATE: Final = 48_000
AUDIO_FRAME: Final = 960  # 20 ms
VIDEO_CLOCK: Final = 90_000
_QUEUE_MAX: Final = 256  # frames a track that nobody reads keeps before dropping the oldest
_LATE_S: Final = 0.1  # a frame handed out this much after its time counts as late


class MediaFileError(LocalError):
    """The file cannot be played: missing, unreadable, no audio/video, undecodable codec."""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    codec: str
    detail: str  # "640x480 yuv420p 30.0 fps" / "48000 Hz stereo"


@dataclass(frozen=True, slots=True)
class MediaInfo:
    path: Path
    format: str
    duration_s: float | None
    audio: StreamInfo | None
    video: StreamInfo | None

    def describe(self) -> str:
        parts = [f"{self.path.name} ({self.format}"]
        if self.duration_s is not None:
            parts.append(f", {self.duration_s:.1f} s")
        parts.append(")")
        if self.video is not None:
            parts.append(f"; video {self.video.codec} {self.video.detail}")
        if self.audio is not None:
            parts.append(f"; audio {self.audio.codec} {self.audio.detail}")
        return "".join(parts)


@dataclass(slots=True)
class FileStats:
    """What has been played so far, per kind."""

    frames: dict[str, int] = field(default_factory=lambda: {"audio": 0, "video": 0})
    late: dict[str, int] = field(default_factory=lambda: {"audio": 0, "video": 0})
    dropped: dict[str, int] = field(default_factory=lambda: {"audio": 0, "video": 0})
    max_late_s: float = 0.0
    packet_bytes: int = 0
    media_s: float = 0.0  # media time of the newest frame handed out
    loops: int = 0

    @property
    def bitrate_kbps(self) -> float:
        return self.packet_bytes * 8 / 1000 / self.media_s if self.media_s > 0 else 0.0


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except FileNotFoundError as exc:
        raise MediaFileError(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise MediaFileError(f"{path}: permission denied") from exc
    except IsADirectoryError as exc:
        raise MediaFileError(f"{path}: is a directory, not a media file") from exc
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaFileError(f"{path}: not a media file FFmpeg can read ({exc})") from exc


def probe(path: Path) -> MediaInfo:
    """Open ``path`` and decode the first frame of its audio and video; raise
    :class:`MediaFileError` with the reason when it cannot be played."""
    with _open(path) as container:
        if container.format.name == "tty":  # FFmpeg renders any text file as ANSI art
            raise MediaFileError(f"{path}: not a media file FFmpeg can read (it is text)")
        audio = container.streams.audio[0] if container.streams.audio else None
        video = container.streams.video[0] if container.streams.video else None
        if audio is None and video is None:
            raise MediaFileError(f"{path}: has no audio or video stream")
        pending = {s.index for s in (audio, video) if s is not None}
        try:
            for packet in container.demux([s for s in (audio, video) if s is not None]):
                if packet.stream.index in pending and packet.decode():
                    pending.discard(packet.stream.index)
                if not pending:
                    break
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaFileError(f"{path}: cannot be decoded ({exc})") from exc
        if pending:
            kinds = [s.type for s in (audio, video) if s is not None and s.index in pending]
            raise MediaFileError(f"{path}: its {' and '.join(kinds)} stream yields no frame")
        duration = container.duration / 1_000_000 if container.duration else None
        return MediaInfo(
            path=path,
            format=container.format.name,
            duration_s=duration,
            audio=StreamInfo(audio.codec_context.name, _audio_detail(audio)) if audio else None,
            video=StreamInfo(video.codec_context.name, _video_detail(video)) if video else None,
        )


def _audio_detail(stream: av.audio.stream.AudioStream) -> str:
    cc = stream.codec_context
    return f"{cc.sample_rate} Hz {cc.layout.name}"


def _video_detail(stream: av.video.stream.VideoStream) -> str:
    cc = stream.codec_context
    rate = float(stream.average_rate) if stream.average_rate else 0.0
    return f"{cc.width}x{cc.height} {cc.format.name if cc.format else '?'} {rate:.1f} fps"


_Item = tuple[float, av.VideoFrame | av.AudioFrame] | None


class _FileTrack(MediaStreamTrack):
    """One kind of a :class:`MediaFile`, fed by its decode thread."""

    def __init__(self, owner: MediaFile, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._owner = owner
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()

    def _push(self, item: _Item) -> None:
        if self._queue.qsize() >= _QUEUE_MAX:
            self._queue.get_nowait()
            self._owner.stats.dropped[self.kind] += 1
        self._queue.put_nowait(item)

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        owner = self._owner
        owner._begin()
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            owner._kind_ended(self.kind)
            raise MediaStreamError
        media_t, frame = item
        owner._clock_from(media_t)
        due = owner._due(media_t)
        delay = due - owner.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay > _LATE_S:
            owner.stats.late[self.kind] += 1
            owner.stats.max_late_s = max(owner.stats.max_late_s, -delay)
        owner.stats.frames[self.kind] += 1
        owner.stats.media_s = max(owner.stats.media_s, media_t)
        return frame

    def stop(self) -> None:
        super().stop()
        self._owner._track_stopped()


class MediaFile:
    """A playable file; see the module docstring."""

    def __init__(
        self,
        path: Path | str,
        *,
        loop: bool = False,
        start: float = 0.0,
        lead_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if start < 0:
            raise MediaFileError("start must be ≥ 0 seconds")
        self.path = Path(path)
        self.info = probe(self.path)
        if self.info.duration_s is not None and start >= self.info.duration_s:
            raise MediaFileError(
                f"{self.path}: start {start:.1f} s is past its end ({self.info.duration_s:.1f} s)"
            )
        self.loop = loop
        self.start = start
        self.lead_s = lead_s
        self.clock = clock
        self.stats = FileStats()
        self.error: str | None = None
        self.audio: MediaStreamTrack | None = _FileTrack(self, "audio") if self.info.audio else None
        self.video: MediaStreamTrack | None = _FileTrack(self, "video") if self.info.video else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0: float | None = None
        self._started = threading.Event()
        self._ended_kinds: set[str] = set()
        self._ended: asyncio.Event | None = None

    @property
    def tracks(self) -> tuple[MediaStreamTrack, ...]:
        return tuple(t for t in (self.audio, self.video) if t is not None)

    def __repr__(self) -> str:
        return f"MediaFile({self.info.describe()}, loop={self.loop}, start={self.start})"

    # -- lifetime -----------------------------------------------------------------------------

    def _begin(self) -> None:
        """First recv() of either track: start decoding."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(
                target=self._run, name=f"mediafile-{self.path.name}", daemon=True
            )
            self._thread.start()

    def _clock_from(self, media_t: float) -> None:
        """The playback clock starts with the first decoded frame handed out."""
        if self._t0 is None:
            self._t0 = self.clock() - media_t
            self._started.set()

    def _due(self, media_t: float) -> float:
        assert self._t0 is not None
        return self._t0 + media_t

    def _track_stopped(self) -> None:
        if all(t.readyState == "ended" for t in self.tracks):
            self.close()

    def close(self) -> None:
        """Stop decoding and end both tracks (waits for the decode thread)."""
        self._stop.set()
        self._started.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        for t in self.tracks:
            if t.readyState == "live":
                MediaStreamTrack.stop(t)

    def _kind_ended(self, kind: str) -> None:
        self._ended_kinds.add(kind)
        if self._ended_kinds >= {t.kind for t in self.tracks}:
            self._ended_event().set()

    def _ended_event(self) -> asyncio.Event:
        if self._ended is None:
            self._ended = asyncio.Event()
        return self._ended

    @property
    def ended(self) -> bool:
        """Every track has handed out its last frame (never, with ``loop``)."""
        return self._ended is not None and self._ended.is_set()

    async def wait_ended(self) -> None:
        """Until every track has handed out its last frame."""
        await self._ended_event().wait()

    # -- decode thread ------------------------------------------------------------------------

    def _deliver(self, kind: str, item: _Item) -> None:
        track = self.audio if kind == "audio" else self.video
        loop = self._loop
        if isinstance(track, _FileTrack) and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(track._push, item)
            except RuntimeError:  # the loop closed meanwhile
                self._stop.set()

    def _wait_until(self, media_t: float) -> bool:
        """Block the decode thread until ``media_t`` is within ``lead_s``; False: stop."""
        while not self._stop.is_set():
            if self._t0 is None:
                if media_t < self.lead_s:
                    return True
                self._started.wait(0.05)
                continue
            ahead = self._t0 + media_t - self.lead_s - self.clock()
            if ahead <= 0:
                return True
            self._stop.wait(min(ahead, 0.05))
        return False

    def _run(self) -> None:
        try:
            self._decode_all()
        except Exception as exc:  # a file that breaks mid-way: end the tracks, say why
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("media.file_decode_failed", path=str(self.path), error=self.error)
        finally:
            for kind in ("audio", "video"):
                self._deliver(kind, None)

    def _decode_all(self) -> None:
        offset = 0.0  # media time at which the current pass through the file starts
        samples = 0  # audio samples handed out (48 kHz), across passes
        while not self._stop.is_set():
            end = offset
            prev_t: float | None = None
            step = 1 / 30  # a video frame's duration: the last interval seen
            for kind, t, frame in self._frames():
                if kind == "video":
                    media_t = offset + t - self.start
                    if not self._wait_until(media_t):
                        return
                    assert isinstance(frame, av.VideoFrame)
                    if frame.format.name != "yuv420p":
                        frame = frame.reformat(format="yuv420p")
                    frame.pts = round(media_t * VIDEO_CLOCK)
                    frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
                    self._deliver("video", (media_t, frame))
                    if prev_t is not None and 0 < media_t - prev_t < 1:
                        step = media_t - prev_t
                    prev_t = media_t
                    end = max(end, media_t + step)
                else:
                    assert isinstance(frame, av.AudioFrame)
                    media_t = samples / AUDIO_RATE
                    if not self._wait_until(media_t):
                        return
                    frame.pts = samples
                    frame.time_base = fractions.Fraction(1, AUDIO_RATE)
                    samples += frame.samples
                    self._deliver("audio", (media_t, frame))
                    end = max(end, samples / AUDIO_RATE)
            if not self.loop or self._stop.is_set() or end <= offset:
                return
            self.stats.loops += 1
            offset = end
            samples = max(samples, round(end * AUDIO_RATE))

    def _frames(self) -> Iterator[tuple[str, float, av.VideoFrame | av.AudioFrame]]:
        """One pass from ``start``: (kind, seconds in the file, frame); audio resampled."""
        with _open(self.path) as container:
            streams = [
                s
                for s in (
                    container.streams.audio[0] if container.streams.audio else None,
                    container.streams.video[0] if container.streams.video else None,
                )
                if s is not None
            ]
            if self.start > 0:
                container.seek(int(self.start * 1_000_000), backward=True, any_frame=False)
            resampler: av.AudioResampler | None = None
            for packet in container.demux(streams):
                if self._stop.is_set():
                    return
                self.stats.packet_bytes += packet.size
                for frame in packet.decode():
                    if not isinstance(frame, av.AudioFrame | av.VideoFrame):
                        continue
                    t = frame.time
                    if t is None or t < self.start - 1e-3:
                        continue
                    if isinstance(frame, av.AudioFrame):
                        if resampler is None:
                            channels = frame.layout.nb_channels
                            resampler = av.AudioResampler(
                                format="s16",
                                layout="mono" if channels == 1 else "stereo",
                                rate=AUDIO_RATE,
                                frame_size=AUDIO_FRAME,
                            )
                        for out in resampler.resample(frame):
                            yield "audio", t, out
                    else:
                        yield "video", t, frame
            if resampler is not None:
                for out in resampler.resample(None):
                    yield "audio", 0.0, out
