"""Encode once, send to every peer; decrypt per receiver. The aiortc hook points.

aiortc creates one encoder per ``RTCRtpSender``, so a mesh of N would encode each local frame
N−1 times. Instead a :class:`SharedEncoder` reads the local track, encodes (VP8 / Opus through
PyAV) and encrypts each frame **once**, and feeds the resulting ``av.Packet`` to one
:class:`FanOutTrack` per peer. aiortc's sender treats a track yielding packets as pre-encoded
and only packetizes them (``Encoder.pack``), which puts the E2EE step exactly between encoder
and packetizer.

Feedback from peers must reach the one encoder. RTCP is handled by ``RTCRtpSender`` itself,
whose keyframe flag and REMB handling only touch its private (pack-only) encoder, so each of
our senders is switched to :class:`_FanOutSender`, a subclass that also forwards PLI/FIR to the
shared encoder and reports REMB to it (the encoder targets the minimum over its peers). We
change the class of our own sender instances (:func:`adopt_sender`) instead of replacing
``aiortc.rtcpeerconnection.RTCRtpSender`` module-wide: aiortc builds senders inside a private
``RTCPeerConnection`` method, and rebinding a module name would affect every peer connection
in the process, not only the mesh's.

Video is encoded **on the event loop** (≈ 0.5–4 ms a frame at 320×240, a key frame the most),
not on a worker thread: PyAV hands the GIL back and forth around libvpx, so with the event
loop busy each encode on a thread waited for the GIL at every hand-over (a 0.5 ms encode took
6.8 ms beside one busy Python thread, at the default 5 ms switch interval), and during a
transport switch encodes on the executor took 15–78 ms where on the loop they took 1–13
(bench/switch.py frame traces). Alternated in one session, encoding on the loop lowered the
median switch gap by ≈ 10 ms each way. ``MATRIXRTC_ENCODE_THREAD=1`` restores the executor
(benchmarks only).

Receive side: aiortc hands each complete depacketized frame to its decoder thread through the
receiver's private ``queue.Queue``. :func:`install_receive_hook` swaps that queue, before the
thread starts, for a :class:`_DecryptingQueue` bound to one remote participant's decryptor:
frames are decrypted on the event loop when aiortc enqueues them, and a frame that fails (or
whose decryptor raises) is dropped and counted. The clear encoded frame can also be handed on
there (``on_encoded``, an :class:`EncodedFrame` whose ``request_keyframe`` makes aiortc send a
PLI): a recorder writes it without re-encoding. Handed-on video restarts at a key frame after each
gap (a sequence gap the frame assembler gave up on, a decrypt failure, a decoder error;
``matrixrtc.media.key_gate``), asked for by PLI: a copy never holds frames that cannot decode.

The clear frame is then **decoded on the event loop too**, and the decoded frames go straight
into the receiver's track queue. aiortc's own path is a decoder thread per receiver that hands
every decoded frame back with ``run_coroutine_threadsafe``: at 8 parties that is 14 threads and
~450 cross-thread wake-ups a second. Decoding inline measured ≈ 10 % less CPU per participant
at n=6 (alternated in one run; py-spy had suggested far more, but it counts threads blocked in
``Condition.wait`` as busy). aiortc's thread still starts, idles on the emptied queue and ends
on its stop sentinel.
Decoding can be switched off per receiver (:meth:`_DecryptingQueue.set_decoding`,
``MeshConfig.decode_video``): frames are still received, decrypted and counted
(``ReceiveStats.encoded_frames``), and video resumes at a key frame asked for by PLI.

Video packets are reassembled by :class:`matrixrtc.mesh.jitter.FrameAssembler` in place of
aiortc's jitter buffer, which stalled a pair for 10–25 s behind one lost packet (the cliff of
the 8-party mesh; see that module).

aiortc private internals used here (aiortc 1.16.0 pinned; exercised by
``tests/unit/test_mesh_fanout.py`` and the mesh integration tests), ten in all:
``RTCRtpReceiver.__decoder_queue`` (replaced), ``__decoder_thread`` (checked not started),
``__decoder_error`` (set to send a PLI), ``__jitter_buffer`` (replaced for video by a router:
VP8 to the assembler, another codec to the original),
``__codecs`` (read: payload type to codec; new with the frame assembler, which replaced a
wrapper around the jitter buffer's ``add``), ``__kind`` (read), ``_track._queue`` (decoded
frames put), and in the ``RTCRtpSender`` subclass ``_send_keyframe``, ``_handle_rtcp_packet``
and ``_ssrc``.

One asyncio private is replaced process-wide, outside this module: ``batch_udp_reads``
(:mod:`matrixrtc.media.ice`, called by the mesh engine and the aiortc SFU client) sets
``asyncio.selector_events._SelectorDatagramTransport._read_ready`` to a loop of CPython 3.11's
method (the same in 3.12.1 and 3.13.0), up to 64 reads per readiness event. A Python upgrade
must compare it with that version's method again; ``tests/unit/test_udp_reads.py`` covers it.
"""

from __future__ import annotations

import asyncio
import fractions
import os
import queue
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import av
import structlog
from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.codecs import get_decoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import TimestampMapper
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, unpack_remb_fci

from matrixrtc.e2ee.frame import frame_key_index
from matrixrtc.errors import LocalError
from matrixrtc.media.frames import EncodedFrame
from matrixrtc.media.key_gate import KeyFrameGate
from matrixrtc.media.sinks import ReceiveStats
from matrixrtc.media.sources import AUDIO_RATE, AUDIO_TIME_BASE, VIDEO_TIME_BASE
from matrixrtc.mesh.jitter import AssembledFrame, FrameAssembler
from matrixrtc.mesh.transform import FrameDecryptor, FrameTransform, vp8_is_keyframe
from matrixrtc.tasks import OwnedTasks

__all__ = [
    "DEFAULT_VIDEO_BITRATE",
    "FanOutTrack",
    "SharedEncoder",
    "adopt_sender",
    "install_receive_hook",
    "set_receive_decoding",
]

log = structlog.get_logger(__name__)

DEFAULT_VIDEO_BITRATE: Final = 500_000
MIN_VIDEO_BITRATE: Final = 150_000
MAX_VIDEO_BITRATE: Final = 1_500_000
# libvpx cannot change its bitrate in place through PyAV: a new target reopens the encoder,
# and its first frame is a key frame for every peer. Not more often than this.
REOPEN_MIN_INTERVAL_S: Final = 5.0
MAX_INTRA_PCT: Final = 450  # libvpx rc_max_intra_bitrate_pct (see _open_vp8)
OPUS_BITRATE: Final = 32_000
OPUS_FRAME_SAMPLES: Final = 960  # 20 ms at 48 kHz
# Benchmarks only (bench/scale.py compares both in one run): aiortc's decoder thread per
# receiver instead of decoding on the event loop.
_DECODER_THREADS: Final = os.environ.get("MATRIXRTC_MESH_DECODER_THREADS") == "1"
# Benchmarks only: aiortc's own video jitter buffer instead of :mod:`matrixrtc.mesh.jitter`.
# Benchmarks only: encode video on the default executor's threads instead of the event loop.
_ENCODE_THREAD: Final = os.environ.get("MATRIXRTC_ENCODE_THREAD") == "1"
_AIORTC_JITTER: Final = os.environ.get("MATRIXRTC_MESH_AIORTC_JITTER") == "1"
# Diagnostics (bench/switch.py --trace-frames), off unless MATRIXRTC_FRAME_TRACE=1. Each
# trace keeps its newest TRACE_ROWS rows: a process left running with the variable set holds
# a few MB, not a row per frame since it started. 50 000 rows is over 7 minutes of 7 peers'
# video at 15 fps, longer than a bench/switch.py member runs (LIMIT_S, 240 s).
TRACE_ROWS: Final = 50_000
_TRACING: Final = os.environ.get("MATRIXRTC_FRAME_TRACE") == "1"
# Every SharedEncoder of the process appends one row per video frame: (label, read from the
# source, encoded, fanned out, pts, bytes, key, queued for how many peers, of how many) ...
FRAME_TRACE: Final[deque[tuple[str, float, float, float, int, int, bool, int, int]] | None] = (
    deque(maxlen=TRACE_ROWS) if _TRACING else None
)
# ... every peer's RTP sender one row per video frame it takes to send: (label, taken, pts) ...
PICKUP_TRACE: Final[deque[tuple[str, float, int]] | None] = (
    deque(maxlen=TRACE_ROWS) if _TRACING else None
)
# ... and every receive hook one row per video frame received and decrypted: (label: transport
# and sender, arrival, RTP timestamp as mapped from the first frame, bytes).
RX_TRACE: Final[deque[tuple[str, float, int, int]] | None] = (
    deque(maxlen=TRACE_ROWS) if _TRACING else None
)


def _packet(data: bytes, pts: int, time_base: fractions.Fraction) -> av.Packet[Any]:
    packet = av.Packet(data)
    packet.pts = pts
    packet.time_base = time_base
    return packet


class FanOutTrack(MediaStreamTrack):
    """One peer's view of a :class:`SharedEncoder`: ``recv()`` yields encoded ``av.Packet`` s.

    A bounded queue decouples the peer from the encoder. Video starts (and restarts after an
    overflow) at a key frame, so a peer that was not reading (still connecting) or fell behind
    resumes with a decodable frame instead of garbage.

    ``admit(key_index)`` (optional) says whether this peer may be sent a frame protected with
    our key at that index, i.e. whether it has been sent that key. A frame it could not decrypt
    is held back (counted in ``held``) instead of sent; video then resumes at a key frame,
    which is asked of the encoder as soon as frames are admitted again.
    """

    def __init__(self, encoder: SharedEncoder, maxsize: int) -> None:
        super().__init__()
        self.kind = encoder.kind
        self.encoder = encoder
        self.packets_sent = 0
        self.overflows = 0
        self.bitrate_report: int | None = None
        self._queue: asyncio.Queue[av.Packet[Any] | None] = asyncio.Queue(maxsize)
        self._need_keyframe = encoder.kind == "video"
        self.admit: Callable[[int], bool] | None = None
        # True: this peer gets the frames without frame E2EE (it cannot decrypt them: Hydrogen,
        # legacy js-sdk), still DTLS-SRTP protected hop by hop.
        self.plain = False
        self.held = 0  # frames not sent: the peer lacked their key
        self._holding = False
        # True: this transport sends nothing more on it (see MediaTransport.hush); the
        # encoder skips its work once every subscriber is paused.
        self.paused = False

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        if self._need_keyframe and self._queue.empty():
            self.encoder.request_keyframe()
        packet = await self._queue.get()
        if packet is None:
            raise MediaStreamError
        self.packets_sent += 1
        if PICKUP_TRACE is not None and self.kind == "video":
            PICKUP_TRACE.append((self.encoder.trace_label, time.monotonic(), int(packet.pts or 0)))
        return packet

    def request_keyframe(self) -> None:
        self.encoder.keyframe_requests_from_peers += 1
        self.encoder.request_keyframe()

    def report_bitrate(self, bitrate: int) -> None:
        self.bitrate_report = bitrate  # read by the encoder's target_bitrate at the next frame

    def stop(self) -> None:
        if self.readyState == "live":
            self.encoder.unsubscribe(self)
            super().stop()
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(None)

    def _push(self, packet: av.Packet[Any], keyframe: bool, key_index: int | None = None) -> bool:
        """Queue one frame for this peer; False: held back or dropped."""
        if self.paused:
            return False
        if self.admit is not None and key_index is not None:
            if not self.admit(key_index):
                self.held += 1
                self._holding = True
                if self.kind == "video":
                    self._need_keyframe = True
                return False
            if self._holding:
                self._holding = False
                if self._need_keyframe and not keyframe:
                    self.encoder.request_keyframe()  # the next frame: nothing else asks
        if self._need_keyframe:
            if not keyframe:
                return False
            self._need_keyframe = False
        if self._queue.full():
            self.overflows += 1
            if self.kind == "video":
                # Dropping one video frame breaks every later one: restart at a key frame.
                while not self._queue.empty():
                    self._queue.get_nowait()
                if not keyframe:
                    self._need_keyframe = True
                    return False
            else:
                self._queue.get_nowait()
        self._queue.put_nowait(packet)
        return True


class SharedEncoder:
    """Reads one local track, encodes and encrypts each frame once, fans it out to peers."""

    def __init__(
        self,
        source: MediaStreamTrack,
        *,
        transform: FrameTransform | None = None,
        queue_frames: int = 8,
        default_bitrate: int = DEFAULT_VIDEO_BITRATE,
        max_bitrate: int = MAX_VIDEO_BITRATE,
    ) -> None:
        if source.kind not in ("audio", "video"):
            raise LocalError(f"unsupported track kind {source.kind!r}")
        self.source = source
        self.kind: str = source.kind
        self.codec = "vp8" if self.kind == "video" else "opus"
        # Feeds the E2EE IV only; see matrixrtc.mesh.transform.
        self.ssrc = secrets.randbits(32)
        self.frames_in = 0  # raw frames read from the source
        self.frames_encoded = 0  # encoder invocations: one per raw frame while anyone listens
        self.keyframes = 0
        self.keyframe_requests_from_peers = 0
        self.encrypt_drops = 0
        self.frames_protected = 0  # encoded frames sent with frame E2EE
        self.frames_plain = 0  # encoded frames sent without (to peers that cannot decrypt)
        self.errors = 0
        self.reopens = 0  # VP8 encoder (re)opened: first frame, size or bitrate change
        self._transform = transform
        self._queue_frames = queue_frames
        self._default_bitrate = default_bitrate
        self._max_bitrate = max_bitrate
        self._subscribers: list[FanOutTrack] = []
        self._force_keyframe = False
        self._resync = False  # frames were dropped: send nothing until the next key frame
        self._tasks = OwnedTasks(f"shared-encoder {self.kind}", log, event_prefix="mesh.encoder")
        self._started = False
        self._video: Any = None  # PyAV VideoCodecContext
        self._video_bitrate = 0
        self._opened_at = 0.0
        self._audio: Any = None
        self._resampler: Any = None
        self._audio_pts = 0
        self.trace_label = ""  # which transport this encoder feeds, for FRAME_TRACE
        # Nobody takes this simulcast layer now (the SFU's dynacast): read and drop every frame.
        self._unwanted = False
        # Every raw frame read, even while paused: a lower simulcast layer's source.
        self.tee: Callable[[av.VideoFrame | av.AudioFrame], None] | None = None

    # -- subscribers and feedback ------------------------------------------------------------

    @property
    def subscribers(self) -> tuple[FanOutTrack, ...]:
        return tuple(self._subscribers)

    def subscribe(self, *, plain: bool = False) -> FanOutTrack:
        """A new peer's track; ``plain``: without frame E2EE (see :attr:`FanOutTrack.plain`)."""
        track = FanOutTrack(self, self._queue_frames)
        track.plain = plain or self._transform is None
        self._subscribers.append(track)
        return track

    def unsubscribe(self, track: FanOutTrack) -> None:
        if track in self._subscribers:
            self._subscribers.remove(track)

    def request_keyframe(self) -> None:
        self._force_keyframe = True

    @property
    def wanted(self) -> bool:
        return not self._unwanted

    def set_wanted(self, wanted: bool) -> None:
        """Encode (the default) or skip every frame: a simulcast layer no subscriber takes
        (LiveKit's dynacast). Encoding resumes at a key frame."""
        if wanted and self._unwanted:
            self._force_keyframe = True
        self._unwanted = not wanted

    @property
    def target_bitrate(self) -> int:
        """The most constrained peer's estimate, clamped; the default before any report."""
        reports = [t.bitrate_report for t in self._subscribers if t.bitrate_report is not None]
        target = min(reports) if reports else self._default_bitrate
        return max(MIN_VIDEO_BITRATE, min(self._max_bitrate, target))

    # -- lifetime ----------------------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._tasks.spawn(self._run(), "encode")

    async def aclose(self) -> None:
        """Stop encoding and end every subscriber; raise if the encoder loop had failed."""
        try:
            await self._tasks.aclose()
        finally:
            for track in list(self._subscribers):
                track.stop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self.source.recv()
                self.frames_in += 1
                if not isinstance(frame, av.VideoFrame | av.AudioFrame):
                    continue  # a pre-encoded source is not what a SharedEncoder is for
                if self.tee is not None:
                    self.tee(frame)
                if self._unwanted or all(t.paused for t in self._subscribers):
                    continue  # nobody listens: read (so the source never backs up), skip work
                force, self._force_keyframe = self._force_keyframe, False
                read_at = time.monotonic()
                try:
                    if isinstance(frame, av.VideoFrame):
                        bitrate = self.target_bitrate
                        if _ENCODE_THREAD:
                            encoded = await loop.run_in_executor(
                                None, self._encode_video, frame, force, bitrate
                            )
                        else:  # on the loop: see the module docstring
                            encoded = self._encode_video(frame, force, bitrate)
                    else:
                        encoded = self._encode_audio(frame)
                    encoded_at = time.monotonic()
                    for data, pts, time_base, keyframe in encoded:
                        sent = self._fan_out(data, pts, time_base, keyframe)
                        if FRAME_TRACE is not None and self.kind == "video":
                            FRAME_TRACE.append((self.trace_label, read_at, encoded_at,
                                                time.monotonic(), pts, len(data), keyframe,
                                                sent, len(self._subscribers)))  # fmt: skip
                except (av.FFmpegError, ValueError) as exc:
                    # One bad frame must not end the track for every peer; the next frame
                    # is made a key frame so decoders resynchronise.
                    self.errors += 1
                    self._force_keyframe = True
                    log.warning("mesh.encoder.frame_failed", kind=self.kind, error=repr(exc))
        except MediaStreamError:
            log.info("mesh.encoder.source_ended", kind=self.kind)

    def _fan_out(self, data: bytes, pts: int, time_base: fractions.Fraction, key: bool) -> int:
        """One encoded frame to every subscriber: encrypted once for the peers with frame
        E2EE, as it is for the others. Returns how many subscribers got it."""
        subscribers = list(self._subscribers)
        queued = 0
        plain = [t for t in subscribers if t.plain]
        protected_for = [t for t in subscribers if not t.plain]
        if plain:
            self.frames_plain += 1
            packet = _packet(data, pts, time_base)
            queued = sum(track._push(packet, key, None) for track in plain)
        if not protected_for or self._transform is None:
            return queued
        try:
            protected = self._transform.encrypt(
                data,
                kind=self.kind,
                codec=self.codec,
                keyframe=key,
                ssrc=self.ssrc,
                timestamp=pts,
            )
        except Exception as exc:  # a transform bug drops the frame, not the track
            log.warning("mesh.encrypt_error", kind=self.kind, error=repr(exc))
            protected = None
        if protected is None:
            self.encrypt_drops += 1
            self._resync = self.kind == "video"
            return queued
        if self._resync and not key:
            # Peers missed frames (e.g. no key yet): a delta frame would not decode.
            self.encrypt_drops += 1
            self._force_keyframe = True
            return queued
        self._resync = False
        self.frames_protected += 1
        packet = _packet(protected, pts, time_base)
        key_index = frame_key_index(protected)
        return queued + sum(track._push(packet, key, key_index) for track in protected_for)

    # -- codecs (PyAV) -----------------------------------------------------------------------

    def _encode_video(
        self, frame: av.VideoFrame, force_keyframe: bool, bitrate: int
    ) -> list[tuple[bytes, int, fractions.Fraction, bool]]:
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        ctx = self._video
        if (
            ctx is None
            or ctx.width != frame.width
            or ctx.height != frame.height
            # libvpx cannot retarget in place through PyAV; reopen on a >10% change, at most
            # every REOPEN_MIN_INTERVAL_S: under load, delay-based REMB from a peer swings, and
            # reopening on every swing made a key frame for all peers several times a second.
            or (
                abs(bitrate - self._video_bitrate) > self._video_bitrate // 10
                and time.monotonic() - self._opened_at >= REOPEN_MIN_INTERVAL_S
            )
        ):
            ctx = self._video = self._open_vp8(frame.width, frame.height, bitrate)
            force_keyframe = True
        if force_keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        packets = ctx.encode(frame)
        self.frames_encoded += 1
        data = b"".join(bytes(p) for p in packets)
        if not data:
            return []
        key = any(p.is_keyframe for p in packets)
        if key:
            self.keyframes += 1
        pts = frame.pts if frame.pts is not None else 0
        return [(data, pts, frame.time_base or VIDEO_TIME_BASE, key)]

    def _open_vp8(self, width: int, height: int, bitrate: int) -> Any:
        ctx = av.CodecContext.create("libvpx", "w")
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.bit_rate = bitrate
        ctx.gop_size = 100_000  # key frames only on request (new peer, PLI/FIR)
        ctx.qmin = 2
        ctx.qmax = 56
        ctx.thread_count = 1
        ctx.options = {
            "deadline": "realtime",
            "cpu-used": "-6",
            "lag-in-frames": "0",
            "minrate": str(bitrate),
            "maxrate": str(bitrate),
            "bufsize": str(bitrate),
            "undershoot-pct": "100",
            "overshoot-pct": "15",
            "static-thresh": "1",
            # Key frames at most this % of a frame's share of the bitrate, as libwebrtc caps
            # them (its formula at 15 fps). Without it libvpx spends ~27 KB (23 packets, ~4 ms)
            # on an encoder's first frame, each time a transport starts publishing.
            "max-intra-rate": str(MAX_INTRA_PCT),
        }
        self._video_bitrate = bitrate
        self._opened_at = time.monotonic()
        self.reopens += 1
        log.info("mesh.encoder.vp8_open", width=width, height=height, bitrate=bitrate)
        return ctx

    def _encode_audio(
        self, frame: av.AudioFrame
    ) -> list[tuple[bytes, int, fractions.Fraction, bool]]:
        if self._audio is None:
            ctx = av.CodecContext.create("libopus", "w")
            ctx.bit_rate = OPUS_BITRATE
            ctx.sample_rate = AUDIO_RATE
            ctx.format = "s16"
            ctx.layout = "mono"
            ctx.time_base = AUDIO_TIME_BASE
            ctx.options = {"application": "voip"}
            self._audio = ctx
            self._resampler = av.AudioResampler(
                format="s16", layout="mono", rate=AUDIO_RATE, frame_size=OPUS_FRAME_SAMPLES
            )
        out: list[tuple[bytes, int, fractions.Fraction, bool]] = []
        for chunk in self._resampler.resample(frame):
            self.frames_encoded += 1
            for packet in self._audio.encode(chunk):
                # Our own running pts: libopus starts at a negative pts (pre-skip).
                out.append((bytes(packet), self._audio_pts, AUDIO_TIME_BASE, False))
                self._audio_pts += OPUS_FRAME_SAMPLES
        return out


class _FanOutSender(RTCRtpSender):
    """An ``RTCRtpSender`` whose PLI/FIR and REMB reach the shared encoder (see module doc)."""

    def _send_keyframe(self) -> None:
        super()._send_keyframe()
        track = self.track
        if isinstance(track, FanOutTrack):
            track.request_keyframe()

    async def _handle_rtcp_packet(self, packet: Any) -> None:
        await super()._handle_rtcp_packet(packet)
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            track = self.track
            if self._ssrc in ssrcs and isinstance(track, FanOutTrack):
                track.report_bitrate(bitrate)


def adopt_sender(sender: RTCRtpSender) -> None:
    """Make one of our senders forward keyframe requests and REMB to its shared encoder."""
    if type(sender) is RTCRtpSender:
        sender.__class__ = _FanOutSender
    elif not isinstance(sender, _FanOutSender):
        raise LocalError(f"cannot adopt a sender of type {type(sender).__name__}")


class _DecryptingQueue(queue.Queue[Any]):
    """aiortc's decoder queue for one receiver, decrypting on the way in (see module doc)."""

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        kind: str,
        decryptor: FrameDecryptor | None,
        stats: ReceiveStats,
        on_encoded: Callable[[EncodedFrame], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        trace_label: str = "",
    ) -> None:
        super().__init__()
        self._trace_label = trace_label
        self._receiver = receiver
        self._kind = kind
        self._decryptor = decryptor
        self._stats = stats
        self._failing = False
        self._on_encoded = on_encoded
        self._decoding = True
        self._need_keyframe = False
        self._decoder: Any = None
        self._decoder_codec: str | None = None
        # Encoded video handed on (a copy) restarts at a key frame after each gap.
        self._clock = clock
        self.copy_gate = KeyFrameGate()
        self.assembler: FrameAssembler | None = None  # video: our jitter buffer, when installed

    def gap(self) -> None:
        """Frames were lost before they reached us (aiortc's jitter buffer gave up on missing
        packets): the encoded copy waits for a key frame."""
        self.copy_gate.gap()

    def set_decoding(self, on: bool) -> None:
        """Decode (and deliver to the track) or only receive, decrypt and count."""
        if on and not self._decoding and self._kind == "video":
            self._need_keyframe = True  # a delta frame after a pause would not decode
            self.request_keyframe()
        self._decoding = on
        self._stats.decoding = on

    def needs_keyframes(self) -> bool:
        """Whether frames after a loss must wait for a key frame: something decodes them or
        takes a copy. Otherwise they are only decrypted and counted, each frame on its own
        (when decoding starts, :meth:`set_decoding` asks for a key frame)."""
        return self._decoding or self._on_encoded is not None

    def request_keyframe(self) -> None:
        """Make aiortc send a PLI with the next packet (its decoder-error flag; any thread)."""
        if self._kind == "video":
            getattr(self._receiver, "_RTCRtpReceiver__decoder_error").set()  # noqa: B009

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:  # aiortc's stop sentinel
            super().put(item, block, timeout)
            return
        codec, frame = item
        data: bytes = frame.data
        clear: bytes | None
        try:
            if self._decryptor is None:
                clear = data
            else:
                name = str(codec.name).lower()
                key = vp8_is_keyframe(data) if name == "vp8" else None
                clear = self._decryptor.decrypt(data, kind=self._kind, codec=name, keyframe=key)
        except Exception as exc:  # a decryptor bug must not break aiortc's receive path
            log.warning("mesh.decrypt_error", kind=self._kind, error=repr(exc))
            clear = None
        if clear is None:
            self._stats.decrypt_failures += 1
            self._failing = True
            self.copy_gate.gap()
            return
        if self._failing:
            # Frames were dropped: the decoder needs a key frame. aiortc sends a PLI for the
            # next packet when this flag (normally set by its decoder thread) is up.
            self._failing = False
            if self.needs_keyframes():
                self.request_keyframe()
        now = self._clock()
        self._stats.frame_received(now, len(data))
        if RX_TRACE is not None and self._kind == "video":
            RX_TRACE.append((self._trace_label, now, int(frame.timestamp), len(data)))
        frame.data = clear
        if self._on_encoded is not None:
            self._hand_on(codec, clear, frame.timestamp)
        if not self._decoding:
            return
        if _DECODER_THREADS:
            super().put((codec, frame), block, timeout)
        else:
            self._decode(codec, frame, clear)

    def _decode(self, codec: Any, frame: Any, clear: bytes) -> None:
        """Decode on the event loop and queue the result on the receiver's track (see the
        module doc); what aiortc's ``decoder_worker`` does, without its thread."""
        name = str(codec.name)
        if self._need_keyframe:
            if name.lower() == "vp8" and not vp8_is_keyframe(clear):
                return
            self._need_keyframe = False
        if name != self._decoder_codec:
            self._decoder = get_decoder(codec)
            self._decoder_codec = name
        try:
            decoded = self._decoder.decode(frame)
        except av.FFmpegError as exc:
            # As aiortc: keep the decoder state and ask for a key frame.
            log.warning("mesh.decode_error", kind=self._kind, codec=name, error=repr(exc))
            self.request_keyframe()
            self.copy_gate.gap()
            return
        track = self._receiver._track
        if track is None:
            return
        out: asyncio.Queue[Any] = track._queue
        for f in decoded:
            out.put_nowait(f)

    def _hand_on(self, codec: Any, clear: bytes, timestamp: int) -> None:
        assert self._on_encoded is not None
        name = str(codec.name).lower()
        keyframe = vp8_is_keyframe(clear) if name == "vp8" else self._kind == "audio"
        if self._kind == "video":
            admit = self.copy_gate.admit(keyframe=keyframe, now=self._clock())
            if admit.ask_key:
                self.request_keyframe()
            if not admit.pass_on:
                return
        try:
            self._on_encoded(
                EncodedFrame(
                    kind=self._kind,
                    codec=name,
                    data=clear,
                    pts=timestamp,  # aiortc's mapped RTP time, as its decoded frames carry
                    time_base=fractions.Fraction(1, int(codec.clockRate)),
                    keyframe=keyframe,
                    request_keyframe=self.request_keyframe,
                )
            )
        except Exception as exc:  # a listener's bug must not break aiortc's receive path
            log.warning("mesh.encoded_tap_error", kind=self._kind, error=repr(exc))


class _VideoReassembly:
    """What a mesh video receiver's ``__jitter_buffer`` becomes: VP8 packets go through the
    :class:`FrameAssembler` (which knows VP8's payload descriptor), any other codec a peer
    negotiated through aiortc's own buffer as before (its gaps still reported)."""

    def __init__(
        self, assembler: FrameAssembler, fallback: Any, codecs: dict[int, Any], on_gap: Any
    ) -> None:
        self._assembler = assembler
        self._fallback = fallback
        self._codecs = codecs
        self._on_gap = on_gap

    def add(self, packet: Any) -> tuple[bool, Any]:
        codec = self._codecs.get(packet.payload_type)
        if codec is not None and str(codec.name).lower() == "vp8":
            return self._assembler.add(packet)
        pli, frame = self._fallback.add(packet)
        if pli:
            self._on_gap()
        return pli, frame


def set_receive_decoding(receiver: RTCRtpReceiver, on: bool) -> bool:
    """Switch decoding of a hooked receiver (:func:`install_receive_hook`) off or back on
    (:meth:`_DecryptingQueue.set_decoding`); False: ``receiver`` has no hook."""
    hook = getattr(receiver, "_RTCRtpReceiver__decoder_queue", None)
    if not isinstance(hook, _DecryptingQueue):
        return False
    hook.set_decoding(on)
    return True


def install_receive_hook(
    receiver: RTCRtpReceiver,
    *,
    decryptor: FrameDecryptor | None,
    stats: ReceiveStats,
    on_encoded: Callable[[EncodedFrame], None] | None = None,
    decode: bool = True,
    trace_label: str = "",
) -> None:
    """Bind ``receiver``'s decode path to one participant's decryptor and counters;
    ``on_encoded`` gets every clear encoded frame before it is decoded; ``decode=False``:
    frames are received, decrypted and counted, not decoded (:meth:`_DecryptingQueue.set_decoding`).

    Must run before aiortc starts the receiver (i.e. before the transport connects).
    """
    if getattr(receiver, "_RTCRtpReceiver__decoder_thread", None) is not None:
        raise LocalError("receive hook must be installed before the receiver starts")
    current = getattr(receiver, "_RTCRtpReceiver__decoder_queue", None)
    if isinstance(current, _DecryptingQueue):
        return
    if not isinstance(current, queue.Queue):
        raise LocalError("unexpected aiortc receiver layout (no decoder queue)")
    kind = str(getattr(receiver, "_RTCRtpReceiver__kind", stats.kind))
    hook = _DecryptingQueue(receiver, kind, decryptor, stats, on_encoded, trace_label=trace_label)
    if not decode:
        hook.set_decoding(False)
    setattr(receiver, "_RTCRtpReceiver__decoder_queue", hook)  # noqa: B010
    jitter = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
    if kind != "video" or jitter is None:
        return
    if not _AIORTC_JITTER:
        codecs: dict[int, Any] = getattr(receiver, "_RTCRtpReceiver__codecs")  # noqa: B009
        mapper = TimestampMapper()

        def deliver(frame: AssembledFrame, packet: Any) -> None:
            codec = codecs.get(packet.payload_type)
            if codec is not None:
                frame.timestamp = mapper.map(frame.timestamp)
                hook.put((codec, frame))

        assembler = FrameAssembler(deliver, on_skip=hook.gap, needs_key=hook.needs_keyframes)
        route = _VideoReassembly(assembler, jitter, codecs, hook.gap)
        setattr(receiver, "_RTCRtpReceiver__jitter_buffer", route)  # noqa: B010
        hook.assembler = assembler
        return
    add = getattr(jitter, "add", None)
    if add is not None:
        # aiortc's jitter buffer reports a sequence gap it gave up on (lost packets, no
        # retransmission in time) as its PLI flag: frames went missing before our queue.
        def add_noting_gaps(packet: Any) -> Any:
            result = add(packet)
            if result[0]:
                hook.gap()
            return result

        setattr(jitter, "add", add_noting_gaps)  # noqa: B010
