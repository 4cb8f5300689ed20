"""One LiveKit connection (one SFU) with Element-Call-compatible per-participant E2EE.

Public API::

    async with LiveKitConnection(creds, publish=True) as conn:   # creds: token.SfuCredentials
        conn.set_remote_key(identity, index, key)   # a remote sender's key (any identity form)
        conn.use_own_key(index, key)                # our key; our frame cryptors follow index
        conn.stats[identity].video_frames           # per remote participant counters
        conn.sent.video_frames                      # what we published

E2EE is the livekit rtc SDK's own frame cryptor, configured as Element Call's
``MatrixKeyProvider`` (spec/livekit.md §B.1/§B.2): per-participant keys, HKDF with salt
``LKFrameEncryptionKey``, ratchet window 10, failure tolerance 10, key ring 256. The SDK's
defaults (PBKDF2, ring 16, tolerance −1) do not interoperate: a PBKDF2-derived key never
decrypts Element Call's frames, and with ring 16 any key index ≥ 16 is "missing".

The SDK's sender frame cryptor does not follow ``set_key``: it keeps encrypting with its own
key index (0 when created). :meth:`LiveKitConnection.use_own_key` therefore sets the index on
every local cryptor, and cryptors created by a later publish get the current index too.

Keys live in a :class:`KeyTable`. A connection attaches to its table when it is created and
detaches when closed; every key set on the table reaches every attached connection at once
(into the SDK's key provider when connected, else at the end of ``connect()``). Connections
of one call share one table (the transport's), so a key cannot miss a connection that is
still opening; a connection made alone gets a private table.

Media is synthetic (``matrixrtc.media.sources``: a moving pattern, default 320×240 at 15 fps,
and a 440 Hz tone) unless ``sources`` gives the tracks to publish (any ``av``-frame tracks, e.g.
a call's published tracks): each is published once its first frame arrives (LiveKit's source
takes that frame's size) and re-captured into a LiveKit source; ``MediaOptions.preencoded``
publishes the synthetic video as a looped clip encoded once (``preencoded``). Every subscribed
remote track is drained and counted in an owned task (``receive.ReceivedTracks``); with a
``frames`` tap that listens, each decoded frame of a rendered track is also handed on as an
``av`` frame with the sender's identity; ``MediaOptions.render_max`` limits how many remote
videos are rendered, the others being counted from their receivers' statistics.

The SDK makes a received track's frame cryptor only once the track is subscribed (its
``on_track_subscribed``), i.e. after RTP already flows, and enables it in a second step; until
then frames reach the VP8 decoder still encrypted. LiveKit's frame format leaves the VP8 header
in clear, so such a key frame *decodes* — to noise — and every later (correctly decrypted)
delta frame builds on it: the track shows noise until the next key frame, which a publisher
sends only when asked (the likely cause of a 1-in-5 noise recording under load, from the SDK's
code; not reproduced on demand). So once a ``frames`` tap
listens (with E2EE), a video track's frames are held back from it until a key frame has been
decoded after the track's cryptor is enabled: the connection waits for the cryptor,
asks for a key frame (the subscription disabled and re-enabled at the SFU, which resumes it at
a key frame) and watches the receiver's ``key_frames_decoded``; counters still count every
frame.

The SDK reports decryption problems only as state changes per participant
(``e2ee_state_changed``), not per frame, so ``decrypt_failures`` counts entries into a failing
state and ``e2ee_events`` keeps when they happened.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self, TypeAlias

import av
import structlog
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from livekit import rtc
from livekit.rtc.participant import PublishTrackError

from matrixrtc.errors import RemoteError
from matrixrtc.livekit.frames import AudioToRtc, video_to_rtc
from matrixrtc.livekit.preencoded import ClipPlayer, EncodedClip, encode_pattern_clip
from matrixrtc.livekit.receive import ReceivedTracks
from matrixrtc.livekit.token import SfuCredentials
from matrixrtc.media.frames import FrameTap
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.tasks import OwnedTasks

__all__ = [
    "ELEMENT_CALL_KEY_RING_SIZE",
    "ConnectionState",
    "KeyTable",
    "LiveKitConnectError",
    "LiveKitConnection",
    "MediaOptions",
    "ParticipantStats",
    "RoomConnection",
    "SentStats",
    "SfuEngine",
    "element_call_e2ee_options",
]

log = structlog.get_logger(__name__)

RATCHET_SALT: Final = b"LKFrameEncryptionKey"
RATCHET_WINDOW_SIZE: Final = 10  # Element Call MatrixKeyProvider
FAILURE_TOLERANCE: Final = 10  # livekit-client KEY_PROVIDER_DEFAULTS, kept by Element Call
ELEMENT_CALL_KEY_RING_SIZE: Final = 256  # indices run 0..255 (matrix-js-sdk)
CONNECT_TIMEOUT_S: Final = 10.0

# States that mean a participant's frames are not being decrypted.
_FAILING: Final = frozenset(
    {
        rtc.EncryptionState.DECRYPTION_FAILED,
        rtc.EncryptionState.MISSING_KEY,
        rtc.EncryptionState.INTERNAL_ERROR,
    }
)
_FAILING_NAMES: Final = frozenset(rtc.EncryptionState.Name(s) for s in _FAILING)
_KIND_NAMES: Final = {rtc.TrackKind.KIND_AUDIO: "audio", rtc.TrackKind.KIND_VIDEO: "video"}
_MAX_EVENTS: Final = 1024
_MAX_FRAME_TIMES: Final = 8192


def element_call_e2ee_options() -> rtc.E2EEOptions:
    """Key provider settings that match Element Call's per-participant mode."""
    return rtc.E2EEOptions(
        key_provider_options=rtc.KeyProviderOptions(
            shared_key=None,
            ratchet_salt=RATCHET_SALT,
            ratchet_window_size=RATCHET_WINDOW_SIZE,
            failure_tolerance=FAILURE_TOLERANCE,
            key_ring_size=ELEMENT_CALL_KEY_RING_SIZE,
            key_derivation_function=rtc.KeyDerivationFunction.HKDF,
        ),
        encryption_type=rtc.EncryptionType.GCM,
    )


class ConnectionState(StrEnum):
    NEW = "new"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the SDK is trying to resume or restart by itself
    LOST = "lost"  # the SDK gave up (or the server removed us): needs a new connection
    CLOSED = "closed"  # closed by us


class LiveKitConnectError(RemoteError):
    """LiveKit refused or dropped the connection, or a publish failed."""


SfuEngine: TypeAlias = Literal["sdk", "aiortc"]
"""The client a LiveKit connection runs on: the livekit Python SDK, or ours over aiortc."""


@dataclass(frozen=True, slots=True)
class MediaOptions:
    """What we publish when a connection publishes."""

    video: bool = True
    audio: bool = True
    width: int = 320
    height: int = 240
    fps: float = 15.0
    tone_hz: float = 440.0
    # Publish simulcast layers (as Element Call does for large calls): the SDK sends the full
    # size and smaller layers, and each receiver's SFU forwards the one it asked for.
    simulcast: bool = False
    # Receivers ask for the low layer once they subscribe to more than this many remote video
    # tracks (a grid of small tiles); None: always the full size.
    low_layer_above: int | None = None
    # Receivers take decoded frames into this process for at most this many remote video
    # tracks (the first subscribed); the others are received, decrypted and counted from the
    # receiver's statistics (matrixrtc.livekit.receive). None: every track.
    render_max: int | None = None
    # Synthetic video: publish a looped VP8 clip of the pattern, encoded once when publishing
    # (matrixrtc.livekit.preencoded), instead of encoding every frame in the SDK.
    preencoded: bool = False
    # The SDK's VP8 encoder (not the pre-encoded clip): its bitrate cap in kbit/s (None: the
    # SDK's default for the size, ≈225 at 320×240, under which WebRTC's rate control drops
    # whole frames of a busy picture: a 133 ms hole at 15 fps that every receiver of this
    # sender sees at once), and whether a loaded encoder keeps the frame rate (and lowers the
    # resolution) instead of WebRTC's balanced preference, which also drops frames.
    max_video_kbps: int | None = None
    keep_framerate: bool = False
    # Which client carries the media: "sdk" (the livekit Python SDK, which decodes every
    # subscribed video) or "aiortc" (our RtcClient, matrixrtc.media_transport.aiortc_engine,
    # which decodes only the first render_max; issue 19).
    engine: SfuEngine = "sdk"


@dataclass(slots=True)
class ParticipantStats:
    """Counters for one remote participant on one connection. Times are clock seconds."""

    identity: str
    video_tracks: int = 0  # video tracks subscribed
    video_subscribed_at: float | None = None  # first video track subscribed
    video_frames: int = 0  # decoded video frames (so: decrypted, when E2EE is on)
    # 100 ms frames out of the SDK's audio stream. It plays concealment/silence when nothing
    # decrypts, so this counts time, not decrypted audio.
    audio_frames: int = 0
    first_audio_at: float | None = None
    last_audio_at: float | None = None
    first_video_at: float | None = None
    last_video_at: float | None = None
    e2ee_state: str | None = None  # last EncryptionState name
    decrypt_failures: int = 0  # entries into DECRYPTION_FAILED / MISSING_KEY / INTERNAL_ERROR
    layer: str | None = None  # the simulcast layer asked for: "high" / "low" / "single"
    rendered: bool | None = None  # frames taken into this process (False: counted from stats)
    video_size: tuple[int, int] | None = None  # of the last decoded frame (the layer received)
    e2ee_events: collections.deque[tuple[float, str]] = field(
        default_factory=lambda: collections.deque(maxlen=_MAX_EVENTS)
    )
    video_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=_MAX_FRAME_TIMES)
    )

    def video_frames_between(self, start: float, end: float) -> int:
        """Decoded video frames whose arrival time lies in ``[start, end)``."""
        return sum(1 for t in self.video_times if start <= t < end)

    def failures_after(self, start: float) -> list[tuple[float, str]]:
        """Failing e2ee state entries at or after ``start``."""
        names = {rtc.EncryptionState.Name(s) for s in _FAILING}
        return [(t, s) for t, s in self.e2ee_events if t >= start and s in names]

    def failing_seconds(self, until: float) -> float:
        """How long, up to ``until``, the SDK reported this participant's frames failing to
        decrypt: from each entry into a failing state to the next OK. The SDK reports states,
        not frames; times the sender's frame rate, this estimates undecryptable frames."""
        names = {rtc.EncryptionState.Name(s) for s in _FAILING}
        total, since = 0.0, None
        for t, state in self.e2ee_events:
            if t > until:
                break
            if state in names:
                since = t if since is None else since
            elif since is not None:
                total += t - since
                since = None
        if since is not None:
            total += until - since
        return total


@dataclass(slots=True)
class SentStats:
    """What this connection published (frames handed to the SDK)."""

    video_frames: int = 0
    audio_frames: int = 0
    video_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=_MAX_FRAME_TIMES)
    )

    def video_frames_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.video_times if start <= t < end)


class RoomConnection(Protocol):
    """What :class:`~matrixrtc.livekit.transport.LiveKitTransport`, :class:`KeyTable` and the
    call's media layer use of a room connection. :class:`LiveKitConnection` (the SDK) is one;
    a second engine (our own client over aiortc, issue 19) is wired from a layer above, which
    may import the mesh's receive hook and encoder, through ``LiveKitTransport``'s
    ``connection_factory``."""

    credentials: SfuCredentials
    publish: bool
    state: ConnectionState
    state_since: float
    connected_at: float | None
    stats: dict[str, ParticipantStats]
    sent: SentStats
    seen_at: dict[str, float]

    @property
    def engine(self) -> SfuEngine:
        """The client this connection runs on."""
        ...

    @property
    def identity(self) -> str: ...

    async def connect(self) -> None: ...

    async def aclose(self) -> None: ...

    def install_remote_key(self, identity: str, index: int, key: bytes) -> None: ...

    def install_own_key(self) -> None: ...

    def published_kinds(self, identity: str) -> frozenset[str] | None: ...

    def decrypting(self, identity: str) -> bool: ...

    def hush(self) -> None:
        """Publish no more frames (the tracks stay published): we left the call."""

    def refresh(self) -> None:
        """Bring ``stats`` up to date now, where they are folded in periodically (an open gap
        read from them is otherwise overstated by up to one fold interval)."""


class KeyTable:
    """Remote senders' keys per (LiveKit identity, index) and our own current key, pushed to
    every attached :class:`LiveKitConnection` (module docstring). No I/O."""

    def __init__(self) -> None:
        self._remote: dict[tuple[str, int], bytes] = {}
        self._own: tuple[int, bytes] | None = None
        # A dict keeps attach order (deterministic installs) and makes detach O(1).
        self._attached: dict[int, RoomConnection] = {}

    @property
    def remote_keys(self) -> Mapping[tuple[str, int], bytes]:
        return dict(self._remote)

    @property
    def own_key(self) -> tuple[int, bytes] | None:
        return self._own

    @property
    def attached(self) -> list[RoomConnection]:
        return list(self._attached.values())

    def attach(self, conn: RoomConnection) -> None:
        self._attached[id(conn)] = conn

    def detach(self, conn: RoomConnection) -> None:
        self._attached.pop(id(conn), None)

    def has_remote_key(self, identity: str) -> bool:
        return any(i == identity for i, _ in self._remote)

    def set_remote_key(self, identity: str, index: int, key: bytes) -> None:
        self._remote[(identity, index)] = key
        for conn in list(self._attached.values()):
            conn.install_remote_key(identity, index, key)

    def use_own_key(self, index: int, key: bytes) -> None:
        self._own = (index, key)
        for conn in list(self._attached.values()):
            conn.install_own_key()


class LiveKitConnection:
    """A LiveKit room connection: E2EE, optional synthetic publishing, per-remote counters."""

    engine: Final[SfuEngine] = "sdk"

    def __init__(
        self,
        credentials: SfuCredentials,
        *,
        publish: bool,
        media: MediaOptions | None = None,
        e2ee: bool = True,
        e2ee_options: rtc.E2EEOptions | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[LiveKitConnection], None] | None = None,
        stats: dict[str, ParticipantStats] | None = None,
        sent: SentStats | None = None,
        keys: KeyTable | None = None,
        sources: Callable[[], Sequence[MediaStreamTrack]] | None = None,
        frames: FrameTap[str] | None = None,
        subscribe_when_keyed: bool = False,
    ) -> None:
        """``sources``: the tracks to publish (called once, when publishing); None: synthetic
        media from ``media``. ``frames``: where decoded remote frames go.

        ``subscribe_when_keyed`` (with E2EE): subscribe to a remote participant's tracks only
        once its key table holds a key from that participant, instead of at once. Until then
        every frame would be undecryptable (a joiner typically connects to LiveKit before the
        others' keys reach it over Matrix); a sender using our key manager is already
        encrypting with the first key it sends a joiner, so from then on frames decrypt.

        ``on_state`` is called (synchronously) whenever :attr:`state` changes. ``stats`` and
        ``sent`` continue the counters of a connection this one replaces. ``keys``: the table
        shared with the other connections of the call (attached from here on); None: a
        private one."""
        self.credentials = credentials
        self.publish = publish
        self.media = media if media is not None else MediaOptions()
        self.e2ee = e2ee
        # Element Call's settings unless told otherwise (tests use the SDK defaults to show
        # that they do not interoperate).
        self._e2ee_options = (
            e2ee_options if e2ee_options is not None else element_call_e2ee_options()
        )
        self._connect_timeout_s = connect_timeout_s
        self._clock = clock
        self.room = rtc.Room()
        self.stats: dict[str, ParticipantStats] = stats if stats is not None else {}
        self.sent = sent if sent is not None else SentStats()
        self.state = ConnectionState.NEW
        self.state_since = clock()
        self._on_state = on_state
        self.connected_at: float | None = None
        # identity -> when this connection first saw it in the room (clock seconds)
        self.seen_at: dict[str, float] = {}
        self.keys = keys if keys is not None else KeyTable()
        self._track_sources = sources
        self._frames = frames
        self.subscribe_when_keyed = subscribe_when_keyed and e2ee
        self._subscribe_requested: set[str] = set()  # publication sids
        self._tasks = OwnedTasks(f"livekit {credentials.identity}", log, event_prefix="livekit")
        # A received track's tasks (sink, fresh key, jitter), by track sid, and whose it is:
        # ended when the track is unsubscribed or its participant goes (the SDK's streams do
        # not end by themselves when a participant vanishes: chaos bug 5).
        self._track_tasks: dict[str, set[asyncio.Task[None]]] = {}
        self._track_owner: dict[str, str] = {}
        self._sources: list[rtc.VideoSource | rtc.AudioSource | rtc.EncodedVideoSource] = []
        self._hushed = False  # we left the call: the sources get no more frames
        self._closed = False
        self.received = ReceivedTracks(
            self.room,
            self.media,
            e2ee=e2ee,
            clock=clock,
            stats_for=self._stats_for,
            spawn=self._spawn_for_track,
            cryptor_enabled=self._cryptor_enabled,
            frames=frames,
        )
        self.room.on("track_subscribed", self._on_track_subscribed)
        self.room.on("track_unsubscribed", self._on_track_unsubscribed)
        self.room.on("track_published", self._on_track_published)
        self.room.on("participant_connected", self._on_participant_connected)
        self.room.on("participant_disconnected", self._on_participant_disconnected)
        self.room.on("e2ee_state_changed", self._on_e2ee_state)
        self.room.on("reconnecting", lambda: self._set_state(ConnectionState.RECONNECTING))
        self.room.on("reconnected", self._on_reconnected)
        self.room.on("disconnected", self._on_disconnected)
        self.keys.attach(self)

    # ------------------------------------------------------------------ lifetime
    @property
    def identity(self) -> str:
        """Our LiveKit identity (the JWT ``sub``)."""
        return self.credentials.identity

    async def connect(self) -> None:
        """Connect, then (when publishing) publish the synthetic tracks."""
        options = rtc.RoomOptions(
            auto_subscribe=not self.subscribe_when_keyed,
            encryption=self._e2ee_options if self.e2ee else None,
            connect_timeout=self._connect_timeout_s,
        )
        try:
            await self.room.connect(self.credentials.url, self.credentials.jwt, options)
        except rtc.ConnectError as exc:
            raise LiveKitConnectError(f"LiveKit connect failed: {exc}") from None
        # From here on the key provider exists, so keys set on the table go straight in; the
        # ones set before (while opening) are installed now, with no await in between.
        self.connected_at = self._clock()
        for identity in self.room.remote_participants:
            self.seen_at.setdefault(identity, self.connected_at)
        kp = self._key_provider()
        if kp is not None:
            for (identity, index), key in self.keys.remote_keys.items():
                kp.set_key(identity, key, index)
            self.install_own_key()
        for identity in list(self.room.remote_participants):
            self._subscribe_if_keyed(identity)
        self._set_state(ConnectionState.CONNECTED)
        log.info(
            "livekit.connected",
            room=self.credentials.room,
            identity=self.identity,
            publish=self.publish,
        )
        if self.publish:
            await self._publish()

    async def aclose(self) -> None:
        """Stop publishing, drain tasks, leave the room. Safe to call twice. Raises the first
        failure of this connection's tasks (each logged when it happened) once all is closed."""
        if self._closed:
            return
        self._closed = True
        self.keys.detach(self)
        self._set_state(ConnectionState.CLOSED)
        try:
            await self._tasks.aclose()
        finally:
            try:
                await self.room.disconnect()
            finally:
                for source in self._sources:
                    await source.aclose()
                self._sources.clear()
                log.info("livekit.closed", room=self.credentials.room, identity=self.identity)

    async def __aenter__(self) -> Self:
        try:
            await self.connect()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _set_state(self, state: ConnectionState) -> None:
        if state is self.state or self.state is ConnectionState.CLOSED:
            return
        log.info(
            "livekit.connection_state",
            room=self.credentials.room,
            old=self.state.value,
            new=state.value,
        )
        self.state, self.state_since = state, self._clock()
        if self._on_state is not None:
            self._on_state(self)

    def _on_reconnected(self) -> None:
        """The SDK got back in by itself. After a full reconnect (the SFU restarted) the room
        is a new session: a participant already back in it with its republished tracks is
        announced by no ``track_published`` (the same as at ``connect()``), and a track the
        SFU kept has lost our subscription. Without auto-subscribe nothing would subscribe
        to them (chaos livekit-restart: one member never got another's media back, when
        both had reconnected by themselves, the sender first). Subscribing again what is
        already subscribed (a resume) is a no-op."""
        self._subscribe_requested.clear()
        for identity in list(self.room.remote_participants):
            self._subscribe_if_keyed(identity)
        log.info(
            "livekit.reconnected",
            room=self.credentials.room,
            subscribed=len(self._subscribe_requested),
            participants=len(self.room.remote_participants),
        )
        self._set_state(ConnectionState.CONNECTED)

    def _on_disconnected(self, reason: int = 0) -> None:
        # Also emitted for our own disconnect(); by then the state is CLOSED and stays so.
        if not self._closed:
            log.warning("livekit.connection_lost", room=self.credentials.room, reason=reason)
            self._set_state(ConnectionState.LOST)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        # SDK callbacks may still fire while and after we close: the task then never runs.
        self._tasks.spawn(coro, name)

    # ------------------------------------------------------------------ keys
    def _key_provider(self) -> rtc.KeyProvider | None:
        if not self.e2ee or self.connected_at is None:  # the SDK makes it in connect()
            return None
        return self.room.e2ee_manager.key_provider

    def set_remote_key(self, identity: str, index: int, key: bytes) -> None:
        """Install a remote sender's key under its LiveKit identity (state or sticky form), in
        this connection and every other one sharing its :attr:`keys`."""
        self.keys.set_remote_key(identity, index, key)

    def use_own_key(self, index: int, key: bytes) -> None:
        """Encrypt our media with ``key`` at ``index`` from now on (on every connection sharing
        :attr:`keys`)."""
        self.keys.use_own_key(index, key)

    def install_remote_key(self, identity: str, index: int, key: bytes) -> None:
        """Put a key into this connection's key provider (the table calls this for every
        attached connection; use :meth:`set_remote_key` to reach them all)."""
        kp = self._key_provider()
        if kp is not None:  # else installed at the end of connect()
            kp.set_key(identity, key, index)
            self._subscribe_if_keyed(identity)

    def _on_track_published(
        self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
    ) -> None:
        self._subscribe_if_keyed(participant.identity)

    def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        self.seen_at.setdefault(participant.identity, self._clock())

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        self.seen_at.pop(participant.identity, None)
        for sid in [s for s, who in self._track_owner.items() if who == participant.identity]:
            self._end_track(sid)

    def _on_track_unsubscribed(
        self,
        track: rtc.Track,
        publication: rtc.RemoteTrackPublication,
        participant: rtc.RemoteParticipant,
    ) -> None:
        self._end_track(track.sid)

    def _spawn_for_track(
        self, sid: str, identity: str, coro: Coroutine[Any, Any, None], name: str
    ) -> None:
        task = self._tasks.spawn(coro, name)
        if task.done():
            return  # spawned while closing: cancelled already
        self._track_owner[sid] = identity
        tasks = self._track_tasks.setdefault(sid, set())
        tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            if not tasks and self._track_tasks.get(sid) is tasks:
                del self._track_tasks[sid]
                self._track_owner.pop(sid, None)

        task.add_done_callback(done)

    def _end_track(self, sid: str) -> None:
        """Cancel a received track's tasks (each closes its stream on the way out)."""
        tasks = self._track_tasks.get(sid)
        if not tasks:
            return
        log.info("livekit.track_ended", track=sid, identity=self._track_owner.get(sid))
        self.received.on_ended(sid)
        for task in list(tasks):
            task.cancel()

    @property
    def track_task_count(self) -> int:
        """Tasks running for received tracks (sinks, key-frame waits, jitter polls)."""
        return sum(len(t) for t in self._track_tasks.values())

    def published_kinds(self, identity: str) -> frozenset[str] | None:
        """The kinds (``"audio"``, ``"video"``) ``identity`` publishes in this room and has not
        muted, as the SFU announced them; None while it is not in the room."""
        participant = self.room.remote_participants.get(identity)
        if participant is None:
            return None
        return frozenset(
            _KIND_NAMES.get(pub.kind, "other")
            for pub in participant.track_publications.values()
            if not pub.muted
        )

    def decrypting(self, identity: str) -> bool:
        """False while ``identity``'s media fails to decrypt (its last E2EE state)."""
        stats = self.stats.get(identity)
        return stats is None or stats.e2ee_state not in _FAILING_NAMES

    def hush(self) -> None:
        self._hushed = True

    def refresh(self) -> None:
        """Nothing to fold: rendered tracks count each frame as it is read; counted ones are
        read from the SDK's statistics every ``COUNT_POLL_S`` (asynchronous)."""

    def _subscribe_if_keyed(self, identity: str) -> None:
        """With ``subscribe_when_keyed``: subscribe to ``identity``'s tracks once we hold a key
        of it (the constructor's docstring)."""
        if not self.subscribe_when_keyed or self._closed:
            return
        participant = self.room.remote_participants.get(identity)
        if participant is None or not self.keys.has_remote_key(identity):
            return
        for sid, pub in participant.track_publications.items():
            if sid in self._subscribe_requested or not isinstance(pub, rtc.RemoteTrackPublication):
                continue
            self._subscribe_requested.add(sid)
            pub.set_subscribed(True)
            log.debug("livekit.subscribe_keyed", identity=identity, track=sid)

    def install_own_key(self) -> None:
        """Put the table's own key into this connection (and set our cryptors' index)."""
        own = self.keys.own_key
        kp = self._key_provider()
        if own is None or kp is None:
            return  # installed at the end of connect()
        kp.set_key(self.room.local_participant.identity, own[1], own[0])
        self._sync_own_key_index()

    def _sync_own_key_index(self) -> None:
        own = self.keys.own_key
        if own is None or not self.e2ee or self.connected_at is None:
            return
        index = own[0]
        me = self.room.local_participant.identity
        for cryptor in self.room.e2ee_manager.frame_cryptors():
            if cryptor.participant_identity == me and cryptor.key_index != index:
                cryptor.set_key_index(index)

    @property
    def own_key_indices(self) -> list[int]:
        """Key index of each of our sender frame cryptors (what goes on the wire)."""
        me = self.room.local_participant.identity
        return [
            c.key_index
            for c in self.room.e2ee_manager.frame_cryptors()
            if c.participant_identity == me
        ]

    # ------------------------------------------------------------------ publishing
    async def _publish(self) -> None:
        if self._track_sources is not None:
            for track in self._track_sources():
                self._spawn(self._publish_track(track), f"livekit-publish-{track.kind}")
            return
        m = self.media
        lp = self.room.local_participant
        try:
            if m.video and m.preencoded:
                clip = await asyncio.to_thread(encode_pattern_clip, m.width, m.height, m.fps)
                esource = rtc.EncodedVideoSource(m.width, m.height)
                self._sources.append(esource)
                etrack = rtc.LocalVideoTrack.create_video_track("synthetic-video", esource)
                await lp.publish_track(
                    etrack,
                    rtc.TrackPublishOptions(
                        source=rtc.TrackSource.SOURCE_CAMERA,
                        video_codec=rtc.VideoCodec.VP8,
                        video_encoder=rtc.VideoEncoderBackend.ENCODER_BACKEND_PRE_ENCODED,
                        simulcast=False,
                    ),
                )
                self._spawn(self._pump_encoded(esource, clip), "livekit-video-source")
            elif m.video:
                vsource = rtc.VideoSource(m.width, m.height)
                self._sources.append(vsource)
                vtrack = rtc.LocalVideoTrack.create_video_track("synthetic-video", vsource)
                await lp.publish_track(
                    vtrack,
                    _encoded_by_sdk(m, simulcast=m.simulcast),
                )
                self._spawn(self._pump_video(vsource), "livekit-video-source")
            if m.audio:
                asource = rtc.AudioSource(48_000, 1)
                self._sources.append(asource)
                atrack = rtc.LocalAudioTrack.create_audio_track("synthetic-audio", asource)
                await lp.publish_track(
                    atrack, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
                )
                self._spawn(self._pump_audio(asource), "livekit-audio-source")
        except PublishTrackError as exc:
            raise LiveKitConnectError(f"LiveKit publish failed: {exc}") from None
        # New sender cryptors start at index 0.
        self._sync_own_key_index()

    async def _publish_track(self, track: MediaStreamTrack) -> None:
        """Publish ``track`` once it has a frame, then copy its frames into LiveKit."""
        lp = self.room.local_participant
        try:
            frame = await track.recv()
            if isinstance(frame, av.VideoFrame):
                vsource = rtc.VideoSource(frame.width, frame.height)
                self._sources.append(vsource)
                await lp.publish_track(
                    rtc.LocalVideoTrack.create_video_track("video", vsource),
                    _encoded_by_sdk(self.media, simulcast=False),
                )
                self._sync_own_key_index()  # a new sender cryptor starts at index 0
                while True:
                    if isinstance(frame, av.VideoFrame) and not self._hushed:
                        vsource.capture_frame(video_to_rtc(frame))
                        self.sent.video_frames += 1
                        self.sent.video_times.append(self._clock())
                    frame = await track.recv()
            else:
                audio = AudioToRtc()
                asource = rtc.AudioSource(audio.sample_rate, audio.channels)
                self._sources.append(asource)
                await lp.publish_track(
                    rtc.LocalAudioTrack.create_audio_track("audio", asource),
                    rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
                )
                self._sync_own_key_index()
                while True:
                    if isinstance(frame, av.AudioFrame) and not self._hushed:
                        for pcm in audio.convert(frame):
                            await asource.capture_frame(pcm)
                        self.sent.audio_frames += 1
                    frame = await track.recv()
        except MediaStreamError:
            log.info("livekit.published_track_ended", kind=track.kind)
        except PublishTrackError as exc:
            log.warning("livekit.publish_failed", kind=track.kind, error=str(exc))
        finally:
            track.stop()

    async def _pump_video(self, source: rtc.VideoSource) -> None:
        m = self.media
        track = SyntheticVideoTrack(m.width, m.height, m.fps)
        try:
            while True:
                frame = await track.recv()
                if self._hushed:
                    continue
                data = frame.to_ndarray().tobytes()  # yuv420p planes, i.e. I420
                source.capture_frame(
                    rtc.VideoFrame(m.width, m.height, rtc.VideoBufferType.I420, data)
                )
                self.sent.video_frames += 1
                self.sent.video_times.append(self._clock())
        finally:
            track.stop()

    async def _pump_encoded(self, source: rtc.EncodedVideoSource, clip: EncodedClip) -> None:
        """The clip at its frame rate, a key frame whenever WebRTC asks for one."""
        player = ClipPlayer(clip)
        loop = asyncio.get_running_loop()
        interval = 1.0 / clip.fps
        start = loop.time()
        n = 0
        while True:
            delay = start + n * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            data, key = player.next(source.take_feedback().keyframe_requested)
            if self._hushed:
                n += 1
                continue
            source.capture_frame(
                rtc.EncodedVideoFrame(
                    data=data,
                    width=clip.width,
                    height=clip.height,
                    codec=rtc.VideoCodec.VP8,
                    frame_type=(
                        rtc.EncodedFrameType.ENCODED_FRAME_KEY
                        if key
                        else rtc.EncodedFrameType.ENCODED_FRAME_DELTA
                    ),
                    timestamp_us=round(n * interval * 1_000_000),
                )
            )
            n += 1
            self.sent.video_frames += 1
            self.sent.video_times.append(self._clock())

    async def _pump_audio(self, source: rtc.AudioSource) -> None:
        track = ToneAudioTrack(self.media.tone_hz)
        try:
            while True:
                frame = await track.recv()
                if self._hushed:
                    continue
                pcm = frame.to_ndarray()
                await source.capture_frame(
                    rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, pcm.shape[-1])
                )
                self.sent.audio_frames += 1
        finally:
            track.stop()

    # ------------------------------------------------------------------ receiving
    def _stats_for(self, identity: str) -> ParticipantStats:
        stats = self.stats.get(identity)
        if stats is None:
            stats = self.stats[identity] = ParticipantStats(identity)
        return stats

    def _on_track_subscribed(
        self,
        track: rtc.Track,
        publication: rtc.RemoteTrackPublication,
        participant: rtc.RemoteParticipant,
    ) -> None:
        self.received.on_subscribed(track, publication, participant)

    def _cryptor_enabled(self, track_sid: str) -> bool | None:
        """Whether the frame cryptor of a received track is enabled (None: it has none yet)."""
        if not self.e2ee or self.connected_at is None:
            return None
        for c in self.room.e2ee_manager.frame_cryptors():
            if c.track_sid == track_sid:
                return c.enabled
        return None

    def _on_e2ee_state(
        self, participant: rtc.Participant | None, state: rtc.EncryptionState.ValueType
    ) -> None:
        if participant is None or participant.identity == self.identity:
            return  # our own sender state
        stats = self._stats_for(participant.identity)
        name = rtc.EncryptionState.Name(state)
        stats.e2ee_state = name
        stats.e2ee_events.append((self._clock(), name))
        if state in _FAILING:
            stats.decrypt_failures += 1
            log.info("livekit.decrypt_failing", identity=participant.identity, state=name)


def _encoded_by_sdk(m: MediaOptions, *, simulcast: bool) -> rtc.TrackPublishOptions:
    """Publish options of a camera track the SDK encodes (VP8), under ``m``'s encoder
    settings (``max_video_kbps``, ``keep_framerate``)."""
    options = rtc.TrackPublishOptions(
        source=rtc.TrackSource.SOURCE_CAMERA,
        video_codec=rtc.VideoCodec.VP8,
        simulcast=simulcast,
    )
    if m.max_video_kbps is not None:
        options.video_encoding.max_bitrate = m.max_video_kbps * 1000
        options.video_encoding.max_framerate = m.fps
    if m.keep_framerate:
        options.degradation_preference = rtc.DegradationPreference.MAINTAIN_FRAMERATE.value
    return options
