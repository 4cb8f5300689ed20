"""Received tracks of one LiveKit connection: layers asked for, frames taken or counted.

:class:`ReceivedTracks` is what a :class:`~matrixrtc.livekit.connection.LiveKitConnection`
does with each subscribed remote track (it owns one; the connection only routes the SDK's
events here):

* **Layers.** With ``MediaOptions.low_layer_above``, every remote video is asked for the low
  simulcast layer once more than that many are subscribed (a grid of small tiles), else the
  full size. A publication without layers is marked ``"single"``: the pinned SDK (livekit
  1.2.1) publishes a source smaller than 480 px on its long side as one layer whatever
  ``simulcast`` says (``compute_video_encodings`` in its Rust core: two layers from 480 px,
  three from 960 px, the smallest 240×180 for 4:3), so a 320×240 publication has nothing
  to choose.
* **Rendered or counted.** A rendered video track opens an ``rtc.VideoStream``: each frame
  the SDK's WebRTC receiver decoded (after the frame cryptor decrypted it) crosses into this
  process as a copied I420 buffer, is counted and goes to the ``frames`` tap when one
  listens. With ``MediaOptions.render_max`` = K, only the first K remote video tracks are
  rendered; the others are still subscribed, received and decrypted, and are *counted* from
  their receiver's ``inbound-rtp`` statistics (``frames_decoded``, every ``COUNT_POLL_S``
  from one read of the subscriber connection's statistics shared by every counted track: a
  receiver's own ``get_stats`` builds the whole report anyway): no frame of theirs crosses
  into Python. The SDK (1.2.1) has no way to
  receive a track without its WebRTC decoder running (its receivers decode whether or not a
  stream reads them, and ``frames_decoded`` counts exactly the frames that decrypted), so a
  counted track saves the per-frame FFI event, copy and conversion, not the VP8 decode.
  ``ParticipantStats.rendered`` says which a track is.
* **Fresh key frame.** Once a ``frames`` tap listens (with E2EE) a rendered track's frames are
  held back until a key frame has been decoded through its enabled frame cryptor (the
  connection module's docstring says why).
* **Audio** is drained from an ``rtc.AudioStream`` in 100 ms frames and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog
from livekit import rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc._proto import ffi_pb2 as proto_ffi

from matrixrtc.livekit.frames import JitterDelay, audio_to_av, video_to_av
from matrixrtc.media.frames import FrameTap

if TYPE_CHECKING:
    from matrixrtc.livekit.connection import MediaOptions, ParticipantStats

__all__ = [
    "AUDIO_FRAME_MS",
    "COUNT_POLL_S",
    "ReceivedTracks",
    "close_stream",
    "enable_publication",
    "key_frames_decoded",
]

log = structlog.get_logger(__name__)

AUDIO_FRAME_MS: Final = 100
# A received video track's frames wait for a key frame decoded through its frame cryptor.
FRESH_KEY_TIMEOUT_S: Final = 5.0  # then they pass anyway (logged)
FRESH_KEY_POLL_S: Final = 0.05
FRESH_KEY_TOGGLE_S: Final = 0.2  # disabled this long to make the SFU resume at a key frame
JITTER_POLL_S: Final = 0.5  # how often a recorded audio track's jitter-buffer delay is read
STREAM_CLOSE_S: Final = 2.0  # a received stream's close waits this long for the SDK's end
COUNT_POLL_S: Final = 0.5  # how often counted (not rendered) tracks' statistics are read


@dataclass
class _FreshKey:
    """Whether a received video track's frames may be handed on (see ``_await_fresh_key``)."""

    started: bool = False  # the wait for the key frame began
    open: bool = False
    held: int = 0  # decoded frames not handed on before it opened


async def _inbound(track: rtc.Track) -> Any | None:
    """The receiver's ``inbound-rtp`` statistics; None: no stats (yet)."""
    for report in await track.get_stats():
        if report.WhichOneof("stats") == "inbound_rtp":
            return report.inbound_rtp.inbound
    return None


async def key_frames_decoded(track: rtc.Track) -> int | None:
    """The receiver's decoded key frame count (its ``inbound-rtp`` stats); None: no stats."""
    try:
        inbound = await _inbound(track)
    except Exception as exc:
        log.info("livekit.stats_failed", error=repr(exc))
        return None
    return 0 if inbound is None else int(inbound.key_frames_decoded)  # 0: nothing decoded yet


def enable_publication(publication: rtc.RemoteTrackPublication, enabled: bool) -> None:
    """Enable or disable a subscribed track at the SFU (LiveKit's track settings). The SDK
    (1.2.1, pinned) has the FFI request but no Python method for it."""
    req = proto_ffi.FfiRequest()
    req.enable_remote_track_publication.track_publication_handle = publication._ffi_handle.handle
    req.enable_remote_track_publication.enabled = enabled
    FfiClient.instance.request(req)


async def close_stream(stream: rtc.VideoStream | rtc.AudioStream) -> None:
    """Close a received stream: its handle goes, and the SDK's reader ends at the stream's
    end-of-stream event. Bounded: should that never come, the reader is cancelled with the
    wait (``aclose`` awaits it)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stream.aclose(), STREAM_CLOSE_S)


class ReceivedTracks:
    """The received side of one connection (module docstring). ``spawn(sid, identity, coro,
    name)`` runs a track's task (ended with the track); ``cryptor_enabled(sid)`` says whether
    a received track's frame cryptor is enabled (None: none yet)."""

    def __init__(
        self,
        room: rtc.Room,
        media: MediaOptions,
        *,
        e2ee: bool,
        clock: Callable[[], float],
        stats_for: Callable[[str], ParticipantStats],
        spawn: Callable[[str, str, Coroutine[Any, Any, None], str], None],
        cryptor_enabled: Callable[[str], bool | None],
        frames: FrameTap[str] | None = None,
    ) -> None:
        self.room = room
        self.media = media
        self.e2ee = e2ee
        self._clock = clock
        self._stats_for = stats_for
        self._spawn = spawn
        self._cryptor_enabled = cryptor_enabled
        self._frames = frames
        self.rendered: set[str] = set()  # sids of the video tracks rendered now
        # The subscriber connection's video inbound-rtp by track sid, read at most once per
        # COUNT_POLL_S for every counted track (see _inbound_by_sid).
        self._session_inbound: dict[str, Any] = {}
        self._session_read_at = float("-inf")
        self._session_lock = asyncio.Lock()

    # -- routing ----------------------------------------------------------------------------
    def on_subscribed(
        self,
        track: rtc.Track,
        publication: rtc.RemoteTrackPublication,
        participant: rtc.RemoteParticipant,
    ) -> None:
        stats = self._stats_for(participant.identity)
        if track.kind == rtc.TrackKind.KIND_VIDEO:
            self.choose_layers()
            stats.video_tracks += 1
            if stats.video_subscribed_at is None:
                stats.video_subscribed_at = self._clock()
            limit = self.media.render_max
            if limit is None or len(self.rendered) < limit:
                self.rendered.add(track.sid)
                stats.rendered = True
                coro = self._render_video(track, publication, stats)
            else:
                stats.rendered = False
                coro = self._count_video(track, stats)
            self._spawn(track.sid, participant.identity, coro, f"livekit-sink-video-{track.sid}")
        elif track.kind == rtc.TrackKind.KIND_AUDIO:
            self._spawn(
                track.sid,
                participant.identity,
                self._count_audio(track, stats),
                f"livekit-sink-audio-{track.sid}",
            )

    def on_ended(self, sid: str) -> None:
        """A received track is gone (its tasks are being ended): a rendering slot frees."""
        self.rendered.discard(sid)

    # -- layers -----------------------------------------------------------------------------
    def choose_layers(self) -> None:
        """Every remote video at the layer that fits (module docstring)."""
        limit = self.media.low_layer_above
        if limit is None:
            return  # the SFU's default (the full size); no layer asked for
        pubs = [
            (p.identity, pub)
            for p in self.room.remote_participants.values()
            for pub in p.track_publications.values()
            if pub.kind == rtc.TrackKind.KIND_VIDEO and pub.subscribed
        ]
        low = len(pubs) > limit
        for identity, pub in pubs:
            stats = self._stats_for(identity)
            if not pub.simulcasted:
                stats.layer = "single"
                continue
            layer = "low" if low else "high"
            if stats.layer != layer:
                pub.set_video_quality(
                    rtc.VideoQuality.VIDEO_QUALITY_LOW
                    if low
                    else rtc.VideoQuality.VIDEO_QUALITY_HIGH
                )
                stats.layer = layer

    # -- video ------------------------------------------------------------------------------
    def _frame_in(self, stats: ParticipantStats, count: int, now: float) -> None:
        stats.video_frames += count
        if stats.first_video_at is None:
            stats.first_video_at = now
            log.info("livekit.first_remote_frame", identity=stats.identity)
        stats.last_video_at = now
        stats.video_times.extend([now] * count)

    async def _render_video(
        self, track: rtc.Track, publication: rtc.RemoteTrackPublication, stats: ParticipantStats
    ) -> None:
        stream = rtc.VideoStream(track)
        fresh = _FreshKey()
        first = True
        try:
            async for event in stream:
                now = self._clock()
                if first:
                    first = False
                    log.info(
                        "livekit.first_video_frame",
                        identity=stats.identity,
                        track=track.sid,
                        cryptor_enabled=self._cryptor_enabled(track.sid),
                        e2ee_state=stats.e2ee_state,
                    )
                if self._frames is not None and self._frames.listening:
                    if self.e2ee and not fresh.started:
                        # Someone takes the frames: first make sure they are not noise (the
                        # connection's doc). Only then: the key frame asked for costs a gap.
                        fresh.started = True
                        self._spawn(
                            track.sid,
                            stats.identity,
                            self._await_fresh_key(track, publication, stats.identity, fresh),
                            f"livekit-fresh-key-{track.sid}",
                        )
                    if self.e2ee and not fresh.open:
                        fresh.held += 1  # maybe built on an undecrypted key frame
                    else:
                        self._frames(stats.identity, video_to_av(event.frame, event.timestamp_us))
                stats.video_size = (event.frame.width, event.frame.height)
                self._frame_in(stats, 1, now)
        finally:
            await close_stream(stream)

    async def _count_video(self, track: rtc.Track, stats: ParticipantStats) -> None:
        """A track not rendered: its frames decoded (so decrypted) by the SDK's receiver,
        read from its statistics (module docstring)."""
        seen = 0
        while True:
            try:
                inbound = (await self._inbound_by_sid()).get(track.sid)
                if inbound is None:  # not (yet) in the connection's report: ask the receiver
                    inbound = await _inbound(track)
            except Exception as exc:  # the track or room is going: its task ends with it
                log.info("livekit.count_stats_failed", identity=stats.identity, error=repr(exc))
                inbound = None
            if inbound is not None:
                decoded = int(inbound.frames_decoded)
                if decoded > seen:
                    if inbound.frame_width and inbound.frame_height:
                        stats.video_size = (int(inbound.frame_width), int(inbound.frame_height))
                    self._frame_in(stats, decoded - seen, self._clock())
                    seen = decoded
            await asyncio.sleep(COUNT_POLL_S)

    async def _inbound_by_sid(self) -> dict[str, Any]:
        """Video ``inbound-rtp`` statistics of the subscriber connection by track sid, read
        again when the last read is ``COUNT_POLL_S`` old (one read serves every counted
        track)."""
        async with self._session_lock:
            if self._clock() - self._session_read_at >= COUNT_POLL_S * 0.9:
                report = await self.room.get_rtc_stats()
                by_sid = {}
                for s in report.subscriber_stats:
                    if (
                        s.WhichOneof("stats") == "inbound_rtp"
                        and s.inbound_rtp.stream.kind == "video"
                    ):
                        by_sid[s.inbound_rtp.inbound.track_identifier] = s.inbound_rtp.inbound
                self._session_inbound = by_sid
                self._session_read_at = self._clock()
            return self._session_inbound

    async def _await_fresh_key(
        self,
        track: rtc.Track,
        publication: rtc.RemoteTrackPublication,
        identity: str,
        fresh: _FreshKey,
    ) -> None:
        """Open ``fresh`` once a key frame has been decoded through the track's enabled frame
        cryptor (the SDK attaches it only after the track is receiving, and a key frame
        decoded before that leaves every later frame noise)."""
        start = self._clock()
        deadline = start + FRESH_KEY_TIMEOUT_S
        try:
            # What had happened by the time frames were first taken (evidence for the race).
            cryptor_at_start = self._cryptor_enabled(track.sid)
            keys_at_start = await key_frames_decoded(track)
            while self._cryptor_enabled(track.sid) is not True:
                if self._clock() >= deadline:
                    log.warning("livekit.no_frame_cryptor", identity=identity, track=track.sid)
                    return
                await asyncio.sleep(FRESH_KEY_POLL_S)
            before = await key_frames_decoded(track)
            if before is None:
                return  # no stats: nothing to wait on
            # Ask for a key frame: LiveKit resumes a re-enabled subscription at one (a PLI to
            # the publisher). Two updates apart, so that the SFU sees the track disabled at all.
            enable_publication(publication, False)
            await asyncio.sleep(FRESH_KEY_TOGGLE_S)
            enable_publication(publication, True)
            while self._clock() < deadline:
                now = await key_frames_decoded(track)
                if now is not None and now > before:
                    log.info(
                        "livekit.fresh_key_frame",
                        identity=identity,
                        track=track.sid,
                        cryptor_at_start=cryptor_at_start,
                        key_frames_at_start=keys_at_start,
                        key_frames_before=before,
                        held_frames=fresh.held,
                        wait_ms=round((self._clock() - start) * 1000),
                    )
                    return
                await asyncio.sleep(FRESH_KEY_POLL_S)
            log.warning("livekit.no_fresh_key_frame", identity=identity, track=track.sid)
        except Exception as exc:  # the SDK's requests fail once the track or room is gone
            log.info("livekit.fresh_key_failed", identity=identity, error=repr(exc))
        finally:
            fresh.open = True

    # -- audio ------------------------------------------------------------------------------
    async def _count_audio(self, track: rtc.Track, stats: ParticipantStats) -> None:
        # Every SDK event passes through this process's event loop (and every stream's filter):
        # 100 ms frames instead of the default 10 ms keep that load a tenth.
        stream = rtc.AudioStream(track, frame_size_ms=AUDIO_FRAME_MS)
        samples = 0  # this stream's samples so far: its clock (see audio_to_av)
        jitter = JitterDelay()
        polling = False
        try:
            async for event in stream:
                stats.audio_frames += 1
                stats.last_audio_at = self._clock()
                if stats.first_audio_at is None:
                    stats.first_audio_at = stats.last_audio_at
                if self._frames is not None and self._frames.listening:
                    if not polling:
                        polling = True
                        self._spawn(
                            track.sid,
                            stats.identity,
                            self._poll_jitter(track, jitter),
                            f"lk-jitter-{track.sid}",
                        )
                    lag = round(jitter.delay_s * event.frame.sample_rate)
                    frame = audio_to_av(event.frame, samples - lag, content=jitter.known)
                    self._frames(stats.identity, frame)
                samples += event.frame.samples_per_channel
        finally:
            await close_stream(stream)

    async def _poll_jitter(self, track: rtc.Track, jitter: JitterDelay) -> None:
        """Keep ``jitter`` at the receiver's current jitter-buffer delay (its stats)."""
        while True:
            try:
                inbound = await _inbound(track)
            except Exception as exc:  # no stats: the stamps stay a plain sample count
                log.info("livekit.jitter_stats_failed", error=repr(exc))
                return
            if inbound is not None:
                jitter.update(inbound.jitter_buffer_delay, inbound.jitter_buffer_emitted_count)
            await asyncio.sleep(JITTER_POLL_S)
