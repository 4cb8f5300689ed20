"""Our own LiveKit client (:class:`~matrixrtc.livekit.rtc_client.RtcClient`, aiortc) as a
:class:`~matrixrtc.livekit.connection.RoomConnection` of
:class:`~matrixrtc.livekit.transport.LiveKitTransport` (issue 19, ``MediaOptions.engine``).

Why here: the receive path (``install_receive_hook``) and the encode-once publisher
(``SharedEncoder`` with the LiveKit-format ``CryptorTransform``) live in :mod:`matrixrtc.mesh`,
which :mod:`matrixrtc.livekit` may not import; this layer may import both.

* Keys: the transport's :class:`~matrixrtc.livekit.connection.KeyTable` pushes every remote key
  and our own current key into :class:`~matrixrtc.e2ee.cryptor.KeyRings` (the same rings the
  decryptors and our encryptor read), so the call's sender-key machinery feeds this engine as it
  feeds the SDK's key provider.
* Decoding: only the first ``media.render_max`` remote video tracks are decoded (None: all);
  the others are received, decrypted and counted (``decode=False``). Audio is decoded only
  while a ``frames`` tap listens (nothing else reads it; the SDK engine decodes it always).
* Frames tap: each decoded frame of a rendered video track, and each decoded audio frame,
  goes to ``frames`` with the sender's identity while it listens, as the SDK engine hands
  them on (our decryptor runs before the decoder, so the SDK path's wait for a fresh key
  frame has no equivalent here). Frames are aiortc's own, stamped on the sender's RTP clock
  as the mesh's are.
* Layers: with ``media.simulcast`` the video is published as two layers
  (:func:`~matrixrtc.livekit.simulcast.layers_for`: ``q`` at half each side, ``h`` full),
  each encoded once by its own ``SharedEncoder``; the full layer's encoder hands every frame
  it reads to the lower layer's :class:`~matrixrtc.media.sources.ScaledFeed`. Dynacast: a
  larger layer that no subscriber takes is not encoded (LiveKit's
  ``SubscribedQualityUpdate``), the smallest always is. With ``media.low_layer_above`` = K a
  receiver asks for the low layer of every remote video once others publish more than K
  (counted from the server's track list, so a joiner asks before its subscriptions start),
  else the full one (``ParticipantStats.layer`` "low" / "high"; "default" without K: LiveKit
  forwards what it chooses). ``video_size`` is that of the last decoded frame of a rendered
  track (None for a counted one: nothing decodes it).
* Stats: every ``SYNC_S`` the per-track :class:`~matrixrtc.media.sinks.ReceiveStats` are folded
  into the transport's :class:`~matrixrtc.livekit.connection.ParticipantStats` (a video frame
  counts once decrypted, rendered or not, as the SDK path counts an unrendered track from its
  receiver's statistics); ``decrypt_failures`` is the decryptor's count, ``e2ee_state`` "OK"
  while a participant's frames decrypt.

Not yet: reconnect (a lost signalling link is ``LOST``; the transport replaces the
connection), ICE addresses and servers from the call's configuration (``RtcClient``'s
defaults: host candidates on 127.0.0.1 only, no TURN — fine inside
``scripts/in-netns``, not for a deployment).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import av
import structlog
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from matrixrtc.e2ee.cryptor import KeyRings
from matrixrtc.livekit.connection import (
    ConnectionState,
    KeyTable,
    MediaOptions,
    ParticipantStats,
    RoomConnection,
    SentStats,
    SfuEngine,
)
from matrixrtc.livekit.rtc_client import ReceivedTrack, RtcClient
from matrixrtc.livekit.signal import QualitiesWanted
from matrixrtc.livekit.simulcast import Quality, SimulcastLayer, layers_for
from matrixrtc.livekit.token import SfuCredentials
from matrixrtc.media.frames import FrameTap
from matrixrtc.media.sinks import ReceiveStats
from matrixrtc.media.sources import ScaledFeed
from matrixrtc.media_transport.local_media import LocalEncoders, local_tracks
from matrixrtc.mesh.fanout import (
    DEFAULT_VIDEO_BITRATE,
    FanOutTrack,
    SharedEncoder,
    adopt_sender,
    install_receive_hook,
    set_receive_decoding,
)
from matrixrtc.mesh.transform import CryptorTransform
from matrixrtc.tasks import OwnedTasks

__all__ = ["AiortcConnection"]

log = structlog.get_logger(__name__)

SYNC_S = 0.05  # how often per-track counters are folded into the participant's
# Larger simulcast layers start unwanted; LiveKit's first dynacast update comes 10 s after a
# track starts at the latest. Without one by this time, every layer is sent.
DYNACAST_FALLBACK_S = 15.0


@dataclass(slots=True)
class _Track:
    received: ReceivedTrack
    stats: ReceiveStats
    counted: int = 0  # encoded_frames already folded into the participant's counters


class AiortcConnection:
    """A room connection on :class:`RtcClient` (module docstring); made by
    :class:`~matrixrtc.livekit.transport.LiveKitTransport` through its ``connection_factory``."""

    engine: Final[SfuEngine] = "aiortc"

    def __init__(
        self,
        credentials: SfuCredentials,
        *,
        publish: bool,
        media: MediaOptions,
        e2ee: bool,
        clock: Callable[[], float],
        on_state: Callable[[RoomConnection], None],
        stats: dict[str, ParticipantStats] | None,
        sent: SentStats | None,
        keys: KeyTable,
        sources: Callable[[], Sequence[MediaStreamTrack]] | None,
        frames: FrameTap[str] | None,
        subscribe_when_keyed: bool,
        shared: LocalEncoders | None = None,
    ) -> None:
        del subscribe_when_keyed  # not yet (module docstring)
        self._frames = frames
        self.credentials = credentials
        self.publish = publish
        self.media = media
        self.e2ee = e2ee
        self._clock = clock
        self._on_state = on_state
        self.stats: dict[str, ParticipantStats] = stats if stats is not None else {}
        self.sent = sent if sent is not None else SentStats()
        self.seen_at: dict[str, float] = {}
        self.state = ConnectionState.NEW
        self.state_since = clock()
        self.connected_at: float | None = None
        self.keys = keys
        self._sources = sources
        self.rings = KeyRings()
        self._tracks: dict[str, _Track] = {}
        self._rendered = 0
        self._asked: dict[str, Quality] = {}  # video track sid -> the layer asked of the server
        self._encoders: list[SharedEncoder] = []
        # With ``shared`` (the call's LocalEncoders) and no simulcast: the call's encoders,
        # which this connection subscribes to and never starts or closes.
        self._shared = shared
        self._owns_encoders = True
        self._published: list[FanOutTrack] = []  # our subscriptions: every layer's
        self._hushed = False
        # Simulcast: each layer's encoder, smallest first (the full layer is also in _encoders).
        self._layers: dict[SimulcastLayer, SharedEncoder] = {}
        self._dynacast_seen = False
        self._video_sid: str | None = None  # LiveKit's sid of our video track, once published
        self._given: list[MediaStreamTrack] = []  # what the encoders read: ours to stop on close
        self._sent_counted: dict[int, int] = {}
        self._tasks = OwnedTasks(
            f"livekit-aiortc {credentials.identity}", log, event_prefix="livekit.aiortc"
        )
        # Receivers that choose their layers (low_layer_above) start each subscription at the
        # low layer: LiveKit's default, the full one, made every publisher encode it (dynacast)
        # for the 5 s it holds a downgrade, each time someone joined.
        self.client = RtcClient(
            credentials.url,
            credentials.jwt,
            on_track=self._on_track,
            adaptive_stream=media.low_layer_above is not None,
        )
        self.client.on_learned = self._choose_layers
        for (identity, index), key in keys.remote_keys.items():
            self.rings.install(identity, index, key)
        keys.attach(self)
        self.install_own_key()

    @property
    def identity(self) -> str:
        return self.credentials.identity

    @property
    def encoders(self) -> Mapping[str, SharedEncoder]:
        """What we publish, by kind (empty until published): their send-side counters. With
        simulcast, "video" is the smallest layer (always sent) and each larger one is
        "video/<rid>"."""
        found = {e.kind: e for e in self._encoders}
        if self._layers:
            for i, (layer, e) in enumerate(self._layers.items()):
                found["video" if i == 0 else f"video/{layer.rid}"] = e
        return found

    def _set_state(self, state: ConnectionState) -> None:
        if state is not self.state:
            self.state, self.state_since = state, self._clock()
            self._on_state(self)

    # ----------------------------------------------------------------------- lifecycle
    async def connect(self) -> None:
        joined = await self.client.connect()
        now = self._clock()
        for identity in joined.others:
            self.seen_at.setdefault(identity, now)
        if self.publish:
            await self._publish()
        self.connected_at = self._clock()
        self._set_state(ConnectionState.CONNECTED)
        self._tasks.spawn(self._sync_loop(), "sync")
        self._tasks.spawn(self._watch(), "watch")

    async def _publish(self) -> None:
        own = self.identity
        transform = (
            CryptorTransform(self.rings.cryptor(own), lambda _: self.rings.cryptor(own))
            if self.e2ee
            else None
        )
        if self._shared is not None and not self.media.simulcast:
            # The call's running encoders (local_media): not ours to start or close. Frames
            # they made before we came are not ours to count as sent.
            self._encoders = list(self._shared.get().values())
            self._owns_encoders = False
            for e in self._encoders:
                self._sent_counted[id(e)] = e.frames_protected + e.frames_plain
        else:
            tracks = local_tracks(self.media, self._sources)
            self._given = tracks
            self._encoders = [SharedEncoder(t, transform=transform) for t in tracks]
            for e in self._encoders:
                e.trace_label = "sfu"
        video = next((e for e in self._encoders if e.kind == "video"), None)
        plan = (
            layers_for(self.media.width, self.media.height, DEFAULT_VIDEO_BITRATE)
            if video is not None and self.media.simulcast
            else ()
        )
        published = {e: e.subscribe(plain=not self.e2ee) for e in self._encoders}
        layers: list[tuple[SimulcastLayer, MediaStreamTrack]] = []
        lower: list[FanOutTrack] = []  # the lower layers' tracks
        if video is not None and len(plan) > 1:
            # The lower layers read what the full layer's encoder reads (its tee), scaled.
            feeds = [ScaledFeed(layer.width, layer.height) for layer in plan[:-1]]
            video.tee = functools.partial(_feed_all, feeds)
            for layer, feed in zip(plan[:-1], feeds, strict=True):
                e = SharedEncoder(
                    feed,
                    transform=transform,
                    default_bitrate=layer.bitrate,
                    max_bitrate=layer.bitrate,
                )
                e.trace_label = f"sfu {layer.rid}"
                self._layers[layer] = e
                self._given.append(feed)
                lower.append(e.subscribe(plain=not self.e2ee))
                layers.append((layer, lower[-1]))
            self._layers[plan[-1]] = video
            layers.append((plan[-1], published[video]))
            self.client.on_qualities = self._qualities_wanted
            # Larger layers wait for a subscriber that takes them (dynacast says so at once
            # for an upgrade): each joiner's full layer otherwise ran until LiveKit's first
            # update, 10 s after the track started, at twelve members for nobody.
            for e in self._layers.values():
                if e is not self._layers[plan[0]]:
                    e.set_wanted(False)
            self._tasks.spawn(self._dynacast_fallback(), "dynacast fallback")
        self._published = [*published.values(), *lower]
        for t in self._published:
            t.paused = self._hushed
        sids = await self.client.publish(
            list(published.values()), on_sender=adopt_sender, layers=layers
        )
        if video is not None:
            self._video_sid = sids.get(published[video].id)
        for e in (*self._encoders, *self._layers.values()) if self._owns_encoders else ():
            e.start()

    async def _dynacast_fallback(self) -> None:
        """A server that never says which layers are wanted gets all of them."""
        await asyncio.sleep(DYNACAST_FALLBACK_S)
        if not self._dynacast_seen:
            log.warning("livekit.aiortc_no_dynacast", waited_s=DYNACAST_FALLBACK_S)
            for e in self._layers.values():
                e.set_wanted(True)

    def _qualities_wanted(self, event: QualitiesWanted) -> None:
        """Dynacast: encode only the layers some subscriber takes (a layer nobody takes is
        skipped until one does; it resumes at a key frame). The smallest layer always runs:
        it is what the call-test reports count as sent."""
        if self._video_sid is not None and event.track_sid != self._video_sid:
            return  # not our layered track (until publish() returns, ours is the only one)
        self._dynacast_seen = True
        smallest = min(self._layers, key=lambda layer: layer.width, default=None)
        for layer, encoder in self._layers.items():
            encoder.set_wanted(layer is smallest or layer.quality in event.enabled)
        log.info("livekit.aiortc_layers_wanted", enabled=sorted(event.enabled))

    async def _watch(self) -> None:
        await self.client.closed.wait()
        if self.client.error is not None:
            log.warning(
                "livekit.aiortc_lost", identity=self.identity, error=repr(self.client.error)
            )
            self._set_state(ConnectionState.LOST)

    async def aclose(self) -> None:
        self.keys.detach(self)
        await self._tasks.cancel()
        try:
            if self._owns_encoders:
                for e in {*self._encoders, *self._layers.values()}:
                    await e.aclose()
            else:
                for t in self._published:  # off the call's shared encoders
                    t.stop()
        finally:
            # The tracks ``sources`` gave are ours to stop (TransportContext.sources):
            # left running, each stays subscribed to the call's published track.
            for track in self._given:
                track.stop()
            self._given = []
        await self.client.aclose()
        if self.state is not ConnectionState.NEW:
            self._set_state(ConnectionState.CLOSED)

    # ----------------------------------------------------------------------- keys
    def install_remote_key(self, identity: str, index: int, key: bytes) -> None:
        self.rings.install(identity, index, key)

    def install_own_key(self) -> None:
        own = self.keys.own_key
        if own is not None:
            self.rings.install(self.identity, own[0], own[1])

    # ----------------------------------------------------------------------- receive
    def _on_track(self, received: ReceivedTrack) -> None:
        identity = received.identity or self.client.owners.get(received.track_id, "")
        if not identity:
            log.warning("livekit.aiortc_track_without_owner", track=received.track_id)
        p = self._stats_for(identity)
        cap = self.media.render_max
        render = received.kind == "video" and (cap is None or self._rendered < cap)
        stats = ReceiveStats(kind=received.kind)
        if render:
            self._rendered += 1
        # Decoded frames queue on the track until read: every track is read (undecoded ones
        # yield nothing), and what a track yields goes to the tap while it listens.
        self._tasks.spawn(
            self._read(received.track, identity, p, stats),
            f"read {received.kind} {received.track_id}",
        )
        # The subscriber offer, so every track, comes after the JoinResponse.
        sif_trailer = self.client.joined.sif_trailer if self.client.joined is not None else b""
        install_receive_hook(
            received.receiver,
            decryptor=(
                self.rings.cryptor(identity, sif_trailer=sif_trailer) if self.e2ee else None
            ),
            stats=stats,
            decode=render or (received.kind == "audio" and self._tap_listening()),
            trace_label=f"sfu {identity}",
        )
        self._tracks[received.track_id] = _Track(received, stats)
        self.seen_at.setdefault(identity, self._clock())
        if received.kind == "video":
            p.video_tracks += 1
            p.rendered = render
            p.layer = "default"
            if p.video_subscribed_at is None:
                p.video_subscribed_at = self._clock()
            self._choose_layers(arrived=received.track_id)

    def _choose_layers(self, arrived: str | None = None) -> None:
        """Every remote video at the layer that fits: the low one once more than
        ``media.low_layer_above`` are published by others (a grid of small tiles), else the
        full size. Counted from the server's list of tracks, so a joiner asks before its
        subscriptions start (LiveKit forwards the full layer to a subscription nobody asked
        otherwise, and dynacast makes every publisher encode it); asked again when a track
        ``arrived``. A publisher without layers is forwarded as it is."""
        limit = self.media.low_layer_above
        if limit is None:
            return  # the server's default: the full size
        subscribed = {sid for sid, t in self._tracks.items() if t.received.kind == "video"}
        videos = subscribed | set(self.client.remote_videos)
        quality: Quality = "low" if len(videos) > limit else "high"
        change = sorted(sid for sid in videos if self._asked.get(sid) != quality or sid == arrived)
        if not change:
            return
        for sid in change:
            self._asked[sid] = quality
            track = self._tracks.get(sid)
            if track is not None:  # a participant's stats start with its first subscription
                identity = track.received.identity or self.client.owners.get(sid, "")
                self._stats_for(identity).layer = quality
        self._tasks.spawn(self.client.set_quality(change, quality), f"layers {quality}")

    def _tap_listening(self) -> bool:
        return self._frames is not None and self._frames.listening

    async def _read(
        self, track: MediaStreamTrack, identity: str, p: ParticipantStats, stats: ReceiveStats
    ) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                stats.frame_decoded(time.monotonic())
                if isinstance(frame, av.VideoFrame):
                    p.video_size = (frame.width, frame.height)
                tap = self._frames
                if tap is None or not tap.listening:
                    continue
                if isinstance(frame, av.VideoFrame | av.AudioFrame):
                    try:
                        tap(identity, frame)
                    except Exception as exc:  # the listener's fault: keep reading
                        log.warning("livekit.aiortc_tap_failed", error=repr(exc))

    def _stats_for(self, identity: str) -> ParticipantStats:
        p = self.stats.get(identity)
        if p is None:
            p = self.stats[identity] = ParticipantStats(identity=identity)
        return p

    def _sync(self) -> None:
        now = self._clock()
        failures: dict[str, int] = {}
        listening = self._tap_listening()
        for t in self._tracks.values():
            if t.received.kind == "audio" and t.stats.decoding is not listening:
                # audio is decoded for the tap alone
                set_receive_decoding(t.received.receiver, listening)
            identity = t.received.identity or self.client.owners.get(t.received.track_id, "")
            p = self._stats_for(identity)
            failures[identity] = failures.get(identity, 0) + t.stats.decrypt_failures
            new = t.stats.encoded_frames - t.counted
            if new <= 0:
                continue
            t.counted = t.stats.encoded_frames
            if t.received.kind == "video":
                # Each frame at its arrival, not at this fold: stamped every SYNC_S, the gaps
                # a reader (the switcher, bench/switch) measures were quantized to 50 ms.
                times = t.stats.received_times(new)
                times = [now] * (new - len(times)) + times
                p.video_frames += new
                p.video_times.extend(times)
                p.first_video_at = p.first_video_at or times[0]
                p.last_video_at = times[-1]
            else:
                p.audio_frames += new
                p.first_audio_at = p.first_audio_at or now
                p.last_audio_at = now
            if self.e2ee:
                p.e2ee_state = "OK"
        for identity, n in failures.items():
            self._stats_for(identity).decrypt_failures = n
        for e in self.encoders.values():  # with simulcast: the smallest layer's frames
            done = e.frames_protected + e.frames_plain
            new = done - self._sent_counted.get(id(e), 0)
            self._sent_counted[id(e)] = done
            if new > 0 and e is self.encoders.get("video"):
                self.sent.video_frames += new
                self.sent.video_times.extend([now] * new)
            elif new > 0 and e.kind == "audio":
                self.sent.audio_frames += new

    async def _sync_loop(self) -> None:
        while True:
            self._sync()
            await asyncio.sleep(SYNC_S)

    # ----------------------------------------------------------------------- queries
    def published_kinds(self, identity: str) -> frozenset[str] | None:
        owned = [sid for sid, who in self.client.owners.items() if who == identity]
        if not owned and identity not in self.seen_at:
            return None
        return frozenset(t.received.kind for sid, t in self._tracks.items() if sid in owned)

    def hush(self) -> None:
        self._hushed = True
        for t in self._published:  # ours only: the encoders may be shared
            t.paused = True

    def refresh(self) -> None:
        self._sync()

    def decrypting(self, identity: str) -> bool:
        now = self._clock()
        p = self.stats.get(identity)
        if p is None:
            return False
        last = max(p.last_video_at or 0.0, p.last_audio_at or 0.0)
        return now - last < 1.0 if self.e2ee else True


def _feed_all(feeds: Sequence[ScaledFeed], frame: av.VideoFrame | av.AudioFrame) -> None:
    for feed in feeds:
        feed.feed(frame)


def _check(c: AiortcConnection) -> RoomConnection:
    return c  # mypy: the engine satisfies the protocol
