"""Recording a call: one WebM file per remote participant and presence, and ``index.json``.

:class:`Recorder` knows nothing about calls: it is told who joined and left and handed decoded
frames (``frame(pid, kind, av_frame)``); ``Call.record`` feeds it. Each presence of a
participant is a *segment*: a WebM file (Opus audio, VP8 video) opened when it joins (or
sends its first frame) and finished when it leaves; coming back opens the next segment.

Passthrough: where the transport hands on the received encoded frames (the mesh, after
decryption; ``EncodedFrame``), VP8 and Opus are written as they came — no re-encoding, the
sender's quality kept. Copied video starts at a key frame (asked for with a PLI through
``EncodedFrame.request_keyframe``); copied audio is kept in place by whole packets (a gap gets
20 ms silence packets). The segment then ignores that participant's decoded frames of the
kind; its ``index.json`` entry says ``"video_passthrough"`` / ``"audio_passthrough"``. Media
from the SFU is re-encoded: LiveKit's Python SDK exposes no received encoded frames.

Files stay playable while they are written and after a crash: the muxer writes live Matroska
(no seeking back) in clusters of at most one second, and every cluster goes to the disk as soon
as it is complete (through :class:`~matrixrtc.media.sealed_file.RecordingFile`, sealed to a
recipient key when one is given). Encoding and muxing run in one thread per segment (PyAV
releases the GIL while encoding), so the event loop only queues frames.

Timing: one clock for audio and video (the recorder's, from the segment's start), so they
stay in step. A frame is placed at its arrival time, or, when it carries its sender's
timestamp, at that timestamp plus the smallest arrival delay seen (``_Timeline``: a burst
after a stall keeps its spacing). Audio time counts samples and jumps forward only over a
gap longer than ``GAP_S`` (counted in the report).

A write error (full disk, I/O error) ends that segment's file — what was written stays
playable — is logged, counted and listed in ``index.json``; the recorder and the call go on.

``index.json`` (rewritten atomically on every change) lists each participant with its segments:
file name, join and leave times (UTC, ISO 8601), frames, bytes, gaps and errors. Sealed to a
recipient, it is ``index.json.sealed`` instead (the whole index, sealed anew on every rewrite):
who was in the call and when is the call's business too; :func:`read_index` reads either.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fractions
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias, cast

import av
import numpy as np
import structlog
from av.video.reformatter import VideoReformatter

from matrixrtc.errors import LocalError
from matrixrtc.media.frames import SAMPLE_CLOCK, EncodedFrame, vp8_frame_size
from matrixrtc.media.sealed_file import SEALED_SUFFIX, RecordingFile, open_sealed, seal_bytes

__all__ = [
    "DRIFT_S",
    "GAP_S",
    "HOLD_S",
    "PASSTHROUGH_AUDIO",
    "PASSTHROUGH_VIDEO",
    "Recorder",
    "SegmentStats",
    "SegmentWriter",
    "index_path",
    "read_index",
]

log = structlog.get_logger(__name__)

GAP_S: Final = 0.1  # more than this without audio is a gap
# Audio stamped by a receiver's sample count (SAMPLE_CLOCK: LiveKit's) further than this from
# where it belongs is moved back into place: silence is inserted, or the overlap dropped. The
# receiver's jitter buffer stretches audio when it runs dry and drops some when it falls behind
# (libwebrtc's NetEq, under load): counting samples alone would carry every such change into
# all later audio. Audio stamped by its sender (RTP time: the mesh) or by its content's time
# (LiveKit's count minus the jitter buffer's delay, livekit/frames.py) is its own clock: a
# gap in it is real, and it runs ahead of its place only when an earlier arrival than any
# before shows that its start was placed late.
DRIFT_S: Final = 0.04
HOLD_S: Final = 1.2  # frames wait this long in the writer before they are placed in time
_JUMP_S: Final = 5.0  # a sender clock jumping this far is a new stream
_REANCHOR_S: Final = 2.0  # frames this much later than the sender's clock says: re-anchor
_FILL_S: Final = 10.0  # audio gaps up to this long are written as silence
_LATE_WINDOW_S: Final = 1.0  # all frames this long late: the stream lost time (< HOLD_S)
_WAIT_FOR_VIDEO_S: Final = 2.0  # audio-first segments wait this long to learn the video size
_MS: Final = fractions.Fraction(1, 1000)
OPUS_SILENCE_20MS: Final = b"\xf8\xff\xfe"  # one CELT 20 ms frame that decodes to silence
_KEYFRAME_ASK_S: Final = 0.5  # copied video waiting for a key frame asks this often
PASSTHROUGH_VIDEO: Final = frozenset({"vp8"})  # received codecs written without re-encoding
PASSTHROUGH_AUDIO: Final = frozenset({"opus"})
_AUDIO_RATE: Final = 48_000
_QUEUE_MAX: Final = 300  # frames waiting for the encoder before new ones are dropped
_MUXER_OPTIONS: Final = {
    "live": "1",  # never seek back: the file is valid at every cluster boundary
    "cluster_time_limit": "1000",  # ms
    "max_interleave_delta": "500000",  # µs: a silent or camera-less peer does not stall muxing
}


INDEX: Final = "index.json"


def index_path(directory: Path) -> Path | None:
    """The index file of the recording in ``directory`` (plain or sealed), None if none."""
    for name in (INDEX, INDEX + SEALED_SUFFIX):
        if (directory / name).is_file():
            return directory / name
    return None


def read_index(directory: Path, private_key: bytes | None = None) -> dict[str, Any]:
    """The index of the recording in ``directory``; a sealed one needs the recipient's
    ``private_key`` (a wrong key raises ``SealedStreamError``)."""
    path = index_path(directory)
    if path is None:
        raise LocalError(f"{directory} holds no recording index")
    if path.name == INDEX:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    if private_key is None:
        raise LocalError(f"{path} is sealed: the recipient's private key reads it")
    data = json.loads(open_sealed(path.read_bytes(), private_key))
    return data


def _utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


def _video_bitrate(width: int, height: int) -> int:
    # ~0.5 bit per pixel per frame at 15 fps: generous, so re-encoding costs little quality.
    return max(300_000, min(4_000_000, width * height * 8))


@dataclass(slots=True)
class SegmentStats:
    frames: dict[str, int] = field(default_factory=lambda: {"audio": 0, "video": 0})
    dropped: int = 0  # frames the encoder could not keep up with
    gaps: int = 0  # audio gaps longer than GAP_S
    gap_s: float = 0.0
    trimmed_s: float = 0.0  # audio dropped to keep stamped audio in place (see DRIFT_S)
    video_passthrough: bool = False  # video written as received (no re-encoding)
    audio_passthrough: bool = False  # audio written as received (no re-encoding)
    error: str | None = None


_Item: TypeAlias = av.AudioFrame | av.VideoFrame | EncodedFrame


class SegmentWriter:
    """One WebM file: frames in (any thread-safe caller), Opus + VP8 out, in its own thread."""

    def __init__(
        self,
        path: Path,
        *,
        recipient: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        video_bitrate: int | None = None,
        bitexact: bool = False,
    ) -> None:
        """``bitexact``: no random ids or version strings in the file (same frames, same
        bytes; for tests)."""
        self.file = RecordingFile(path, recipient)
        self.bitexact = bitexact
        self.path = path
        self.stats = SegmentStats()
        self._clock = clock
        self._t0 = clock()
        self._bitrate = video_bitrate
        self._queue: queue.Queue[tuple[str, float, _Item] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"rec-{path.name}", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> bool:
        return self.stats.error is not None

    def put(self, kind: str, frame: _Item) -> None:
        """Queue one decoded (or encoded, see :class:`_Muxer`) frame, stamped now; never
        blocks."""
        if self._closed or self.failed:
            return
        if self._queue.qsize() >= _QUEUE_MAX:
            self.stats.dropped += 1
            return
        self._queue.put((kind, self._clock() - self._t0, frame))

    def close(self, timeout: float = 10.0) -> None:
        """Encode what is queued, finish the file (blocks; call it from a thread)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        mux = _Muxer(self, self._bitrate)
        held: collections.deque[tuple[str, float, float | None, _Item]]
        held = collections.deque()
        timelines = {"audio": _Timeline(), "video": _Timeline()}

        def release(until: float) -> None:
            while held and held[0][1] <= until and not self.failed:
                kind, arrival, src, frame = held.popleft()
                mux.add(kind, timelines[kind].place(arrival, src), frame)

        try:
            while (item := self._queue.get()) is not None:
                if self.failed:
                    continue
                kind, arrival, frame = item
                # Audio arrives when it ends (LiveKit hands 100 ms frames, aiortc 20 ms): its
                # first sample was there one frame earlier.
                if isinstance(frame, av.AudioFrame) and frame.sample_rate:
                    arrival -= frame.samples / frame.sample_rate
                elif isinstance(frame, EncodedFrame) and frame.kind == "audio":
                    arrival -= (opus_samples(frame.data) or 0) / _AUDIO_RATE
                src = frame.time
                timelines[kind].observe(arrival, src, sample_clock=_sample_clock(frame))
                held.append((kind, arrival, src, frame))
                release(arrival - HOLD_S)
            release(float("inf"))
            mux.finish()
        except Exception as exc:
            self._fail(exc)
        finally:
            mux.abandon()
            with contextlib.suppress(Exception):
                self.file.close()

    def _fail(self, exc: BaseException) -> None:
        if self.stats.error is None:
            self.stats.error = self.file.error or f"{type(exc).__name__}: {exc}"
            log.warning("recorder.segment_failed", file=self.path.name, error=self.stats.error)


class _Timeline:
    """Where one stream's frames go on the recorder's clock.

    A frame that carries its sender's timestamp (aiortc's decoded frames do: RTP time) is
    placed at that timestamp plus the smallest arrival delay seen so far, so frames delivered
    in a burst (held back by a jitter buffer, or waiting for a key) keep their original
    spacing. The writer holds frames for ``HOLD_S`` before placing them, so a burst's
    first frames are placed with what its later ones taught. Frames without a timestamp are
    placed at their arrival. A jump in the sender's clock (a new stream) or a lasting extra
    delay re-anchors the stream at the current frame.

    A sample-clock stream (``SAMPLE_CLOCK``: stamped by the receiver's sample count) that
    falls behind for good — every frame of the last ``_LATE_WINDOW_S`` (stream time) later
    than the offset says, by more than ``GAP_S`` — lost audio, not just arrived late: from
    its first late frame on it is placed with the larger delay. A stall followed by a burst
    never does this: the burst's last frames arrive on time again. Sender-stamped streams
    never need it: lost media shows as a jump in their stamps. A sample-clock stream's offset
    changes apply from the frame that showed them on, never to frames before it (their
    count was right).
    """

    def __init__(self) -> None:
        self.offset: float | None = None
        self.last_src: float | None = None
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        # Sample clock: (from this src on, this offset); earlier frames keep earlier offsets.
        self._steps: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)

    def observe(self, arrival: float, src: float | None, *, sample_clock: bool = False) -> None:
        if src is None:
            return
        delay = arrival - src
        if (
            self.offset is None
            or self.last_src is None
            or abs(src - self.last_src) > _JUMP_S
            or delay < self.offset
            or delay > self.offset + _REANCHOR_S
        ):
            self.offset = delay
            self._recent.clear()
            self._step(src, delay)
        self.last_src = src
        if not sample_clock:
            self._steps.clear()  # one offset for every frame: a burst's first frames too
            return
        recent = self._recent
        recent.append((src, delay))
        while len(recent) > 1 and recent[1][0] <= src - _LATE_WINDOW_S:
            recent.popleft()
        if recent[0][0] <= src - _LATE_WINDOW_S:  # the window is covered by frames
            window = [(s, d) for s, d in recent if s > src - _LATE_WINDOW_S]
            late = min(d for _, d in window)
            if late > self.offset + GAP_S:
                self.offset = late
                self._step(window[0][0], late)

    def _step(self, src: float, offset: float) -> None:
        while self._steps and self._steps[-1][0] >= src:
            self._steps.pop()
        self._steps.append((src, offset))

    def place(self, arrival: float, src: float | None) -> float:
        if src is None or self.offset is None:
            return arrival
        for since, offset in reversed(self._steps):
            if src >= since:
                return src + offset
        return src + self.offset


def opus_samples(packet: bytes) -> int | None:
    """Samples (at 48 kHz) in one Opus packet, from its TOC byte (RFC 6716 §3.1)."""
    if not packet:
        return None
    config, code = packet[0] >> 3, packet[0] & 0x03
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        size = (480, 960, 1920, 2880)[config % 4]
    elif config < 16:  # hybrid: 10, 20 ms
        size = (480, 960)[config % 2]
    else:  # CELT: 2.5, 5, 10, 20 ms
        size = (120, 240, 480, 960)[config % 4]
    if code == 0:
        return size
    if code in (1, 2):
        return 2 * size
    return size * (packet[1] & 0x3F) if len(packet) > 1 else None


def _sample_clock(frame: _Item) -> bool:
    return isinstance(frame, av.AudioFrame) and frame.opaque is SAMPLE_CLOCK


def _silence_like(frame: av.AudioFrame, samples: int) -> av.AudioFrame:
    """``samples`` of silence in ``frame``'s format, layout and rate."""
    channels = len(frame.layout.channels)
    dtype = frame.to_ndarray().dtype
    shape = (channels, samples) if frame.format.is_planar else (1, samples * channels)
    out = av.AudioFrame.from_ndarray(
        np.zeros(shape, dtype), format=frame.format.name, layout=frame.layout.name
    )
    out.sample_rate = frame.sample_rate
    return out


def _audio_tail(frame: av.AudioFrame, skip: int) -> av.AudioFrame:
    """``frame`` without its first ``skip`` samples."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    data = data[:, skip:] if frame.format.is_planar else data[:, skip * channels :]
    out = av.AudioFrame.from_ndarray(data, format=frame.format.name, layout=frame.layout.name)
    out.sample_rate = frame.sample_rate
    return out


class _Muxer:
    """The writer thread's state: container, encoders, timestamps."""

    def __init__(self, seg: SegmentWriter, bitrate: int | None) -> None:
        self.seg = seg
        self.bitrate = bitrate
        self.container: av.container.OutputContainer | None = None
        self.audio: av.audio.stream.AudioStream | None = None
        self.video: av.video.stream.VideoStream | None = None
        self.size: tuple[int, int] | None = None
        self.pending: list[tuple[str, float, _Item]] = []
        # Copied video: received VP8 frames written as they came (see the class doc).
        self.copy_video = False
        self.copy_audio: bool | None = None  # received Opus packets written as they came
        self.need_key = True
        self.asked_key_at: float | None = None
        self.resampler: av.AudioResampler | None = None
        self.reformatter = VideoReformatter()
        self.samples = 0  # audio samples out of the resampler (48 kHz): the next pts
        self.fed = 0  # where the next audio sample into the resampler belongs (48 kHz)
        self.last_video_ms = -1

    def add(self, kind: str, t: float, frame: _Item) -> None:
        if kind == "audio":
            # The first audio frame decides: received Opus copied, or decoded audio encoded.
            copy = isinstance(frame, EncodedFrame)
            if self.copy_audio is None:
                self.copy_audio = self.seg.stats.audio_passthrough = copy
            elif copy != self.copy_audio:
                return
        elif isinstance(frame, EncodedFrame):
            if self.container is not None and not self.copy_video:
                return  # the file was opened for re-encoded video
            self.copy_video = self.seg.stats.video_passthrough = True
            if self.need_key:
                size = vp8_frame_size(frame.data) if frame.keyframe else None
                if size is None:
                    self._ask_key(t, frame)
                    return  # a copied stream starts at a key frame
                self.need_key = False
                self.size = self.size or size
        elif isinstance(frame, av.VideoFrame) and self.copy_video:
            return  # the received encoded frames are written instead
        if self.container is None:
            if isinstance(frame, av.VideoFrame) and self.size is None:
                self.size = (frame.width - frame.width % 2, frame.height - frame.height % 2)
            self.pending.append((kind, t, frame))
            if self.size is None and t - self.pending[0][1] < _WAIT_FOR_VIDEO_S:
                return
            self._open(self.size or (320, 240))
            pending, self.pending = self.pending, []
            for item in pending:
                self._encode(*item)
            return
        self._encode(kind, t, frame)

    def _open(self, size: tuple[int, int]) -> None:
        container = av.open(self.seg.file, mode="w", format="webm", options=_MUXER_OPTIONS)
        container.flags |= cast(int, av.container.Flags.flush_packets.value)
        if self.seg.bitexact:
            container.flags |= cast(int, av.container.Flags.bitexact.value)
        audio = container.add_stream("libopus", rate=_AUDIO_RATE)
        audio.layout = "stereo"
        audio.bit_rate = 64_000
        # libvpx's realtime mode adapts its speed to the time encoding takes: not
        # reproducible, so bit-exact files use its "good" mode at its fastest setting.
        deadline = "good" if self.seg.bitexact else "realtime"
        # A copied stream needs no encoder options: its packets never pass the encoder.
        options = {} if self.copy_video else {"deadline": deadline, "cpu-used": "8"}
        video = container.add_stream("libvpx", options=options | {"lag-in-frames": "0"})
        video.thread_count = 1
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.bit_rate = self.bitrate or _video_bitrate(*size)
        video.codec_context.time_base = _MS
        video.codec_context.gop_size = 60
        self.container, self.audio, self.video, self.size = container, audio, video, size

    def _ask_key(self, t: float, frame: EncodedFrame) -> None:
        if frame.request_keyframe is None:
            return
        if self.asked_key_at is None or t - self.asked_key_at >= _KEYFRAME_ASK_S:
            self.asked_key_at = t
            frame.request_keyframe()

    def _encode(self, kind: str, t: float, frame: _Item) -> None:
        assert self.container is not None
        assert self.audio is not None
        assert self.video is not None
        stats = self.seg.stats
        if isinstance(frame, av.VideoFrame) and self.copy_video:
            return  # queued before the first encoded frame came
        if isinstance(frame, EncodedFrame) and frame.kind == "audio":
            self._copy_audio(t, frame)
            return
        if isinstance(frame, EncodedFrame):
            ms = max(self.last_video_ms + 1, round(t * 1000))
            self.last_video_ms = ms
            packet = av.Packet(frame.data)
            packet.pts = packet.dts = ms
            packet.time_base = _MS
            packet.stream = self.video
            packet.is_keyframe = frame.keyframe
            self._mux([packet])
            stats.frames["video"] += 1
            return
        if isinstance(frame, av.VideoFrame):
            ms = max(self.last_video_ms + 1, round(t * 1000))
            self.last_video_ms = ms
            assert self.size is not None
            # Always a new frame: the caller's frame may be shared with other listeners, and
            # its timestamps are set here. Our own reformatter: frame.reformat() keeps one on
            # the frame, and two writers reformatting a shared frame at once crash in FFmpeg.
            if (frame.width, frame.height) != self.size or frame.format.name != "yuv420p":
                frame = self.reformatter.reformat(
                    frame, width=self.size[0], height=self.size[1], format="yuv420p"
                )
            else:
                frame = av.VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
            frame.pts = ms
            frame.time_base = _MS
            frame.pict_type = av.video.frame.PictureType.NONE
            self._mux(self.video.encode(frame))
            stats.frames["video"] += 1
            return
        if self.resampler is None:
            self.resampler = av.AudioResampler(
                format="s16", layout="stereo", rate=_AUDIO_RATE, frame_size=960
            )
        start = round(t * _AUDIO_RATE)  # where this frame's first sample belongs
        # Stamped audio is kept within DRIFT_S of its place: a gap is filled with silence,
        # audio running ahead is cut back (see DRIFT_S). Unstamped audio is placed by its
        # jittery arrival: only a real gap (GAP_S) moves it.
        stamped = frame.time is not None
        fill_at = DRIFT_S if stamped else GAP_S
        if not stats.frames["audio"]:
            # Silence before the first frame is no gap.
            self.samples = self.fed = max(0, start)
        elif start - self.fed > fill_at * _AUDIO_RATE:
            gap = start - self.fed
            if gap > GAP_S * _AUDIO_RATE:
                stats.gaps += 1
                stats.gap_s += gap / _AUDIO_RATE
            if gap <= _FILL_S * _AUDIO_RATE:
                # Silence, written: any player keeps the audio after it in its place.
                self._resample_and_encode(
                    _silence_like(frame, gap * frame.sample_rate // _AUDIO_RATE)
                )
            else:  # a long pause (muted): a jump in the timestamps costs no bytes
                self.samples += gap
            self.fed += gap
        elif self.fed - start > DRIFT_S * _AUDIO_RATE and stamped:
            # Written audio runs ahead of this frame's time: drop what overlaps.
            cut = round((self.fed - start) * frame.sample_rate / _AUDIO_RATE)
            stats.trimmed_s += min(cut, frame.samples) / frame.sample_rate
            if cut >= frame.samples:
                return
            frame = _audio_tail(frame, cut)
        self.fed += round(frame.samples * _AUDIO_RATE / frame.sample_rate)
        stats.frames["audio"] += 1
        self._resample_and_encode(frame)

    def _copy_audio(self, t: float, frame: EncodedFrame) -> None:
        """One received Opus packet into the file as it is; kept within DRIFT_S of its place
        by whole packets: a gap gets 20 ms silence packets, a packet running ahead is left
        out."""
        assert self.audio is not None
        stats = self.seg.stats
        n = opus_samples(frame.data)
        if n is None:
            return  # not an Opus packet: nothing a decoder could use
        start = round(t * _AUDIO_RATE)
        if not stats.frames["audio"]:
            self.samples = self.fed = max(0, start)
        elif start - self.fed > DRIFT_S * _AUDIO_RATE:
            gap = start - self.fed
            if gap > GAP_S * _AUDIO_RATE:
                stats.gaps += 1
                stats.gap_s += gap / _AUDIO_RATE
            if gap <= _FILL_S * _AUDIO_RATE:
                for _ in range(round(gap / 960)):
                    self._mux_audio(OPUS_SILENCE_20MS, 960)
            self.samples = self.fed = start
        elif self.fed - start > DRIFT_S * _AUDIO_RATE:
            stats.trimmed_s += n / _AUDIO_RATE
            return
        self._mux_audio(frame.data, n)
        stats.frames["audio"] += 1

    def _mux_audio(self, data: bytes, samples: int) -> None:
        assert self.audio is not None
        packet = av.Packet(data)
        packet.pts = packet.dts = self.samples
        packet.time_base = fractions.Fraction(1, _AUDIO_RATE)
        packet.stream = self.audio
        self._mux([packet])
        self.samples += samples
        self.fed += samples

    def _resample_and_encode(self, frame: av.AudioFrame) -> None:
        assert self.resampler is not None
        assert self.audio is not None
        for out in self.resampler.resample(frame):
            out.pts = self.samples
            out.time_base = fractions.Fraction(1, _AUDIO_RATE)
            self.samples += out.samples
            self._mux(self.audio.encode(out))

    def _mux(self, packets: list[av.Packet[Any]]) -> None:
        assert self.container is not None
        for packet in packets:
            self.container.mux(packet)

    def finish(self) -> None:
        if self.container is None:
            if not self.pending:
                return
            self._open(self.size or (320, 240))
            pending, self.pending = self.pending, []
            for item in pending:
                self._encode(*item)
        assert self.container is not None
        assert self.audio is not None
        assert self.video is not None
        if self.resampler is not None and not self.copy_audio:
            for out in self.resampler.resample(None):
                out.pts = self.samples
                self.samples += out.samples
                self._mux(self.audio.encode(out))
        if not self.copy_audio:
            self._mux(self.audio.encode(None))
        if not self.copy_video:
            self._mux(self.video.encode(None))
        container, self.container = self.container, None
        container.close()

    def abandon(self) -> None:
        """After a failure: drop the container without writing more."""
        container, self.container = self.container, None
        if container is not None:
            with contextlib.suppress(Exception):
                container.close()


# -- the recorder ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Segment:
    file: str
    joined_at: float
    writer: SegmentWriter | None
    left_at: float | None = None
    stats: SegmentStats | None = None
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        stats = self.writer.stats if self.writer is not None else self.stats
        assert stats is not None
        nbytes = self.writer.file.bytes_written if self.writer is not None else self.bytes
        return {
            "file": self.file,
            "joined_at": _utc(self.joined_at),
            "left_at": _utc(self.left_at) if self.left_at is not None else None,
            "frames": dict(stats.frames),
            "bytes": nbytes,
            "dropped_frames": stats.dropped,
            "audio_gaps": stats.gaps,
            "video_passthrough": stats.video_passthrough,
            "audio_passthrough": stats.audio_passthrough,
            "error": stats.error,
        }


@dataclass(slots=True)
class _Participant:
    pid: str
    info: dict[str, Any]
    stem: str
    segments: list[_Segment] = field(default_factory=list)

    @property
    def current(self) -> _Segment | None:
        if self.segments and self.segments[-1].left_at is None:
            return self.segments[-1]
        return None


def _stem(pid: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", pid.lstrip("@")).strip("._") or "participant"
    base = base[:80]
    stem, n = base, 2
    while stem in taken:
        stem, n = f"{base}-{n}", n + 1
    taken.add(stem)
    return stem


class Recorder:
    """Writes every participant's media under ``directory``; see the module docstring.

    ``pid`` is any stable participant key (``Call.record`` uses the member id); ``info`` is
    written to ``index.json`` as given (user id, device id…)."""

    def __init__(
        self,
        directory: Path,
        *,
        recipient: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        video_bitrate: int | None = None,
    ) -> None:
        self.directory = directory
        self.recipient = recipient
        self._clock = clock
        self._wall = wall_clock
        self._bitrate = video_bitrate
        self._participants: dict[str, _Participant] = {}
        self._stems: set[str] = set()
        self._closed = False
        # joined/left run on the event loop, finish/close in worker threads: one lock keeps
        # the participant table and index.json consistent (frame() only reads).
        self._lock = threading.RLock()
        self.started_at = wall_clock()
        self.errors: list[str] = []
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalError(f"cannot create the recording directory {directory}: {exc}") from exc
        if index_path(directory) is not None:
            raise LocalError(f"{directory} already holds a recording (its index)")
        self._write_index()

    @property
    def participants(self) -> dict[str, _Participant]:
        return self._participants

    def joined(self, pid: str, info: dict[str, Any] | None = None) -> None:
        """``pid`` is (again) in the call: open its next segment."""
        with self._lock:
            self._joined(pid, info)

    def _joined(self, pid: str, info: dict[str, Any] | None) -> None:
        if self._closed:
            return
        p = self._participants.get(pid)
        if p is None:
            p = _Participant(pid, dict(info or {}), _stem(pid, self._stems))
            self._participants[pid] = p
        elif info:
            p.info.update(info)
        if p.current is not None:
            return
        suffix = ".webm" + (SEALED_SUFFIX if self.recipient is not None else "")
        name = f"{p.stem}.{len(p.segments) + 1}{suffix}"
        try:
            writer: SegmentWriter | None = SegmentWriter(
                self.directory / name,
                recipient=self.recipient,
                clock=self._clock,
                video_bitrate=self._bitrate,
            )
            stats = None
        except LocalError as exc:
            writer, stats = None, SegmentStats(error=str(exc))
            self.errors.append(str(exc))
            log.warning("recorder.segment_not_opened", file=name, error=str(exc))
        p.segments.append(_Segment(name, self._wall(), writer, stats=stats))
        log.info("recorder.segment_started", participant=pid, file=name)
        self._write_index()

    def frame(self, pid: str, kind: str, frame: _Item) -> None:
        """One frame from ``pid`` (opens a segment if it has none): decoded, or a received
        encoded video frame to write as it is (:data:`PASSTHROUGH_VIDEO` codecs)."""
        if self._closed:
            return
        p = self._participants.get(pid)
        if p is None or p.current is None:
            self.joined(pid)
            p = self._participants[pid]
        seg = p.current
        if seg is not None and seg.writer is not None:
            seg.writer.put(kind, frame)

    def left(self, pid: str) -> SegmentWriter | None:
        """``pid`` left: its segment is finished. Returns the writer to close (blocking, from
        a thread: see :meth:`finish`)."""
        with self._lock:
            p = self._participants.get(pid)
            seg = p.current if p is not None else None
            if seg is None:
                return None
            seg.left_at = self._wall()
            self._write_index()
            return seg.writer

    def finish(self, writer: SegmentWriter | None) -> None:
        """Close a writer returned by :meth:`left` (blocks) and record its outcome."""
        if writer is None:
            return
        writer.close()
        with self._lock:
            for p in self._participants.values():
                for seg in p.segments:
                    if seg.writer is writer:
                        seg.stats, seg.bytes = writer.stats, writer.file.bytes_written
                        seg.writer = None
                        if writer.stats.error:
                            self.errors.append(writer.stats.error)
            self._write_index()

    def close(self) -> None:
        """Finish every open segment (blocks; from a thread when a loop is running)."""
        with self._lock:
            if self._closed:
                return
            writers = [self.left(pid) for pid in list(self._participants)]
            self._closed = True
        for w in writers:
            self.finish(w)
        with self._lock:
            self._write_index()

    # -- index.json and the report ------------------------------------------------------------

    def index(self) -> dict[str, Any]:
        return {
            "version": 1,
            "started_at": _utc(self.started_at),
            "encrypted": self.recipient is not None,
            "finished": self._closed,
            "participants": [
                {
                    "id": p.pid,
                    **{k: v for k, v in p.info.items() if k != "id"},
                    "segments": [s.to_json() for s in p.segments],
                }
                for p in self._participants.values()
            ],
        }

    def _write_index(self) -> None:  # with self._lock held
        data = (json.dumps(self.index(), indent=2) + "\n").encode()
        path = self.directory / INDEX
        if self.recipient is not None:
            path = path.with_name(INDEX + SEALED_SUFFIX)
            data = seal_bytes(data, self.recipient)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            msg = f"writing {path} failed: {exc.strerror or exc}"
            if msg not in self.errors:
                self.errors.append(msg)
                log.warning("recorder.index_failed", error=msg)

    def segment_writers(self) -> list[SegmentWriter]:
        return [s.writer for p in self._participants.values() for s in p.segments if s.writer]
