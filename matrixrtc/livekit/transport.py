"""LiveKit transport: one :class:`LiveKitConnection` per SFU the call needs (spec §3.2).

Public API::

    async with LiveKitTransport(room_id=…, own=OwnDevice(…), openid=hs.request_openid_token,
                                session=http) as lk:
        await lk.update(session.memberships, own_membership)   # open/close connections
        call_keys.add_sink(lk.keys)                            # keys pushed as they come
        lk.connections                                         # transport -> connection

Which SFUs: every member's media is where ``publish_transport(member, oldest)`` says (the
oldest-membership rule and multi-SFU are both in that function); we connect to each distinct
LiveKit transport among them, and publish only on our own. With ``oldest_membership`` that is
one connection (the oldest member's SFU, publish and subscribe); with ``multi_sfu`` it is our
own SFU (publish) plus every other SFU a member publishes on (subscribe only).

Token endpoint per connection (spec §3.4): the SFU we publish on gets the endpoint of the
dialect we advertise (sticky → ``/get_token``, state → ``/sfu/get``), so that our LiveKit
identity is the one other members compute from our membership; a subscribe-only SFU gets
``/get_token`` with ``/sfu/get`` as fallback.

Repair: when LiveKit drops a connection (the SDK gives up, or its own resume has not
succeeded within ``resume_grace_s``), the connection is replaced by a new one with fresh
credentials, and failed opens are retried with backoff; counters carry over, so a gap shows in
the per-participant frame times. :attr:`LiveKitTransport.repairs` records each one.

Keys: one :class:`~matrixrtc.livekit.connection.KeyTable` per transport holds every remote key
and our own current key (with its index). Each connection is attached to it the moment it is
created (credentials in hand, before it connects) and stays attached through connecting,
connected and being replaced, so every key reaches every connection in whatever state (a
sender's frames may reach us through any SFU); one opened later gets all keys so far. The
table is a :class:`~matrixrtc.call_keys.KeySink`: the call's key manager pushes keys into it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import aiohttp
import structlog
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.errors import MatrixRTCError, RemoteError
from matrixrtc.livekit.connection import (
    ConnectionState,
    KeyTable,
    LiveKitConnection,
    MediaOptions,
    ParticipantStats,
    RoomConnection,
    SentStats,
)
from matrixrtc.livekit.token import Endpoint, SfuCredentials, request_credentials
from matrixrtc.matrix.homeserver import OpenIdToken
from matrixrtc.media.frames import FrameTap
from matrixrtc.model.livekit_ids import (
    DEFAULT_SLOT_ID,
    legacy_identity,
    livekit_identity,
    livekit_room_alias,
)
from matrixrtc.model.membership import CallMembership
from matrixrtc.model.transports import LivekitTransport
from matrixrtc.session.transports import publish_transport
from matrixrtc.tasks import OwnedTasks

__all__ = ["ConnectionFactory", "LiveKitTransport", "OwnDevice", "Plan", "plan_connections"]

log = structlog.get_logger(__name__)


RESUME_GRACE_S = 3.0  # the SDK's own resume gets this long before we replace the connection
RETRY_MIN_S = 0.5
RETRY_MAX_S = 8.0
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Repair:
    """A connection LiveKit dropped, and when its replacement was up (clock seconds)."""

    transport: LivekitTransport
    lost_at: float  # when it left the connected state
    restored_at: float


@dataclass(frozen=True, slots=True)
class OwnDevice:
    """Who we are in the call."""

    user_id: str
    device_id: str
    member_id: str
    sticky: bool  # we advertise the sticky form (m.rtc.member) rather than the state form


@dataclass(frozen=True, slots=True)
class Plan:
    """The connections a membership list calls for: transport → do we publish there."""

    connections: Mapping[LivekitTransport, bool]

    @property
    def publish_on(self) -> LivekitTransport | None:
        return next((t for t, pub in self.connections.items() if pub), None)


def _key(t: LivekitTransport) -> LivekitTransport:
    # livekit_alias is per room, not per server: it must not split one SFU into two.
    return LivekitTransport(livekit_service_url=t.livekit_service_url.rstrip("/"))


def plan_connections(memberships: Sequence[CallMembership], own: CallMembership | None) -> Plan:
    """Pure: which SFUs to connect to, oldest member's first (see module docstring)."""
    oldest = memberships[0] if memberships else None
    wanted: dict[LivekitTransport, bool] = {}
    if own is not None:
        mine = publish_transport(own, oldest if oldest is not None else own)
        if isinstance(mine, LivekitTransport):
            wanted[_key(mine)] = True
    for m in memberships:
        if own is not None and m.key == own.key:
            continue
        t = publish_transport(m, oldest)
        if isinstance(t, LivekitTransport):
            wanted.setdefault(_key(t), False)
    return Plan(wanted)


class ConnectionFactory(Protocol):
    """Makes one room connection; :class:`LiveKitConnection` (the SDK) by default."""

    def __call__(
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
    ) -> RoomConnection: ...


class LiveKitTransport:
    """Opens and closes LiveKit connections as the call's memberships change, and replaces
    connections LiveKit drops (module docstring, "Repair")."""

    def __init__(
        self,
        *,
        room_id: str,
        own: OwnDevice,
        openid: Callable[[], Awaitable[OpenIdToken]],
        session: aiohttp.ClientSession | None = None,
        media: MediaOptions | None = None,
        e2ee: bool = True,
        slot_id: str = DEFAULT_SLOT_ID,
        resume_grace_s: float = RESUME_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
        sources: Callable[[], Sequence[MediaStreamTrack]] | None = None,
        frames: FrameTap[str] | None = None,
        subscribe_when_keyed: bool = False,
        connection_factory: ConnectionFactory = LiveKitConnection,
    ) -> None:
        """``sources``: the tracks each publishing connection publishes (None: synthetic media
        from ``media``); ``frames``: where decoded remote frames go, by LiveKit identity;
        ``subscribe_when_keyed``: see :class:`LiveKitConnection`; ``connection_factory``: the
        engine of each connection (see :class:`~matrixrtc.livekit.connection.RoomConnection`)."""
        self._connection_factory = connection_factory
        self.subscribe_when_keyed = subscribe_when_keyed
        self._sources = sources
        self._frames = frames
        self.room_id = room_id
        self.own = own
        self._openid = openid
        self._session = session
        self._own_session = session is None
        self.media = media if media is not None else MediaOptions()
        self.e2ee = e2ee
        self.slot_id = slot_id
        self.resume_grace_s = resume_grace_s
        self._clock = clock
        self.connections: dict[LivekitTransport, RoomConnection] = {}
        self.failures: dict[LivekitTransport, MatrixRTCError] = {}
        self.repairs: list[Repair] = []
        self._plan = Plan({})
        self._retry: dict[LivekitTransport, tuple[float, float]] = {}  # → (at, backoff)
        # Counters of a replaced connection, kept until its successor opens.
        self._carry: dict[LivekitTransport, tuple[dict[str, ParticipantStats], SentStats]] = {}
        self._lost_at: dict[LivekitTransport, float] = {}
        self.keys = KeyTable()  # the one place keys are kept; see the module docstring
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks = OwnedTasks("livekit-transport", log, event_prefix="livekit.transport")
        self._supervising = False
        self._closed = False

    # ------------------------------------------------------------------ lifetime
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop repairing, close every connection; then raise the first failure (of the
        supervisor, or of a connection's tasks), each logged when it happened."""
        failure = await self._tasks.cancel()
        async with self._lock:
            self._closed = True
            conns, self.connections = list(self.connections.values()), {}
            results = await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
            if self._own_session and self._session is not None:
                await self._session.close()
            self._session = None
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                log.error("livekit.connection_close_failed", error=repr(r))
                failure = failure or (r if isinstance(r, RemoteError) else RemoteError(repr(r)))
        if failure is not None:
            raise failure

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    # ------------------------------------------------------------------ connections
    async def update(
        self, memberships: Sequence[CallMembership], own: CallMembership | None
    ) -> Plan:
        """Make the open connections match ``plan_connections(memberships, own)``.

        A connection that fails to open is recorded in :attr:`failures` and retried in the
        background with backoff. Returns the plan.
        """
        plan = plan_connections(memberships, own)
        async with self._lock:
            if self._closed:
                return plan
            self._plan = plan
            for t in list(self._retry):
                if t not in plan.connections:
                    self._forget(t)
            stale = [
                t
                for t, conn in self.connections.items()
                if plan.connections.get(t) is None or plan.connections[t] != conn.publish
            ]
            for t in stale:
                log.info("livekit.connection_closing", transport=t.livekit_service_url)
                await self.connections.pop(t).aclose()
                self._forget(t)
            new = [(t, pub) for t, pub in plan.connections.items() if t not in self.connections]
            await self._open_all(new)
        self._ensure_supervisor()
        return plan

    def hush(self) -> None:
        """Publish no more frames on any connection (see ``RoomConnection.hush``)."""
        for conn in self.connections.values():
            conn.hush()

    def refresh(self) -> None:
        """Every connection's statistics up to date now (see ``RoomConnection.refresh``)."""
        for conn in self.connections.values():
            conn.refresh()

    def lost(self) -> bool:
        """Whether a connection the plan calls for is not up now: being resumed by the SDK,
        being replaced, or failing to open (the transport keeps trying)."""
        for t in self._plan.connections:
            conn = self.connections.get(t)
            if conn is None or conn.state in (ConnectionState.RECONNECTING, ConnectionState.LOST):
                return True
        return False

    def _forget(self, t: LivekitTransport) -> None:
        self._retry.pop(t, None)
        self._carry.pop(t, None)
        self._lost_at.pop(t, None)
        self.failures.pop(t, None)

    async def _open_all(self, wanted: Sequence[tuple[LivekitTransport, bool]]) -> None:
        results = await asyncio.gather(
            *(self._open(t, pub) for t, pub in wanted), return_exceptions=True
        )
        unexpected: BaseException | None = None
        for (t, _), result in zip(wanted, results, strict=True):
            # Whatever the factory made (any engine): not an exception means a connection.
            if not isinstance(result, BaseException):
                self.connections[t] = result
                self.failures.pop(t, None)
                self._retry.pop(t, None)
                self._carry.pop(t, None)
                lost_at = self._lost_at.pop(t, None)
                if lost_at is not None:
                    repair = Repair(t, lost_at, self._clock())
                    self.repairs.append(repair)
                    log.info(
                        "livekit.connection_repaired",
                        transport=t.livekit_service_url,
                        seconds=round(repair.restored_at - repair.lost_at, 3),
                    )
            elif isinstance(result, MatrixRTCError):
                self.failures[t] = result
                _, backoff = self._retry.get(t, (0.0, RETRY_MIN_S / 2))
                backoff = min(RETRY_MAX_S, backoff * 2)
                self._retry[t] = (self._clock() + backoff, backoff)
                log.warning(
                    "livekit.connection_failed",
                    transport=t.livekit_service_url,
                    error=str(result),
                    retry_s=backoff,
                )
            elif isinstance(result, BaseException) and unexpected is None:
                unexpected = result
        if unexpected is not None:
            raise unexpected

    async def _open(self, transport: LivekitTransport, publish: bool) -> RoomConnection:
        if publish:
            endpoint = Endpoint.GET_TOKEN if self.own.sticky else Endpoint.SFU_GET
        else:
            endpoint = Endpoint.AUTO
        creds = await request_credentials(
            self._http(),
            transport.livekit_service_url,
            room_id=self.room_id,
            user_id=self.own.user_id,
            device_id=self.own.device_id,
            member_id=self.own.member_id,
            openid=await self._openid(),
            endpoint=endpoint,
            slot_id=self.slot_id,
        )
        expected = (
            livekit_identity(self.own.user_id, self.own.device_id, self.own.member_id)
            if creds.endpoint is Endpoint.GET_TOKEN
            else legacy_identity(self.own.user_id, self.own.device_id)
        )
        if creds.identity != expected or creds.room != livekit_room_alias(
            self.room_id, self.slot_id
        ):
            # An older service (lk-jwt-service < v0.4.3 hashed differently): others will not
            # find our keys' identity, or we are not in their LiveKit room.
            log.warning(
                "livekit.unexpected_token_claims",
                transport=transport.livekit_service_url,
                identity=creds.identity,
                expected_identity=expected,
                room=creds.room,
            )
        stats, sent = self._carry.get(transport, (None, None))
        conn = self._connection_factory(
            creds,
            publish=publish,
            media=self.media,
            e2ee=self.e2ee,
            clock=self._clock,
            on_state=lambda _: self._wake.set(),
            stats=stats,
            sent=sent,
            keys=self.keys,  # attached now: later keys reach it while it opens
            sources=self._sources,
            frames=self._frames,
            subscribe_when_keyed=self.subscribe_when_keyed,
        )
        try:
            await conn.connect()
        except BaseException:
            await conn.aclose()
            raise
        log.info(
            "livekit.connection_open",
            transport=transport.livekit_service_url,
            endpoint=creds.endpoint.value,
            publish=publish,
        )
        return conn

    # ------------------------------------------------------------------ repair
    def _ensure_supervisor(self) -> None:
        if not self._supervising and not self._closed:
            self._supervising = True
            self._tasks.spawn(self._supervise(), "supervisor")

    def _next_check_s(self) -> float | None:
        now = self._clock()
        due = [at for at, _ in self._retry.values()]
        due += [
            c.state_since + self.resume_grace_s
            for c in self.connections.values()
            if c.state is ConnectionState.RECONNECTING
        ]
        return max(0.0, min(due) - now) if due else None

    async def _supervise(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._next_check_s()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            async with self._lock:
                if self._closed:
                    return
                try:
                    await self._repair()
                except Exception as exc:  # keep supervising; the next wake-up retries
                    log.error("livekit.repair_failed", error=repr(exc))
                    self._retry = {
                        t: (self._clock() + RETRY_MAX_S, RETRY_MAX_S) for t in self._retry
                    }

    async def _repair(self) -> None:
        now = self._clock()
        for t, conn in list(self.connections.items()):
            overdue = (
                conn.state is ConnectionState.RECONNECTING
                and now - conn.state_since >= self.resume_grace_s
            )
            if conn.state is ConnectionState.LOST or overdue:
                # A new token makes the service create the room again, should the SFU have
                # lost it (a restart); the old connection keeps retrying the old one.
                log.info("livekit.connection_replacing", transport=t.livekit_service_url)
                del self.connections[t]
                self._lost_at.setdefault(t, conn.state_since)
                self._carry[t] = (conn.stats, conn.sent)
                self._retry[t] = (now, RETRY_MIN_S / 2)
                try:
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await conn.aclose()
                except TimeoutError:
                    log.warning("livekit.close_timeout", transport=t.livekit_service_url)
        due = [
            (t, pub)
            for t, pub in self._plan.connections.items()
            if t not in self.connections and self._retry.get(t, (now + 1, 0.0))[0] <= now
        ]
        if due:
            await self._open_all(due)

    # ------------------------------------------------------------------ keys
    def set_remote_key(self, identity: str, index: int, key: bytes) -> None:
        """A remote sender's key, for every connection (open, opening or opened later)."""
        self.keys.set_remote_key(identity, index, key)

    def use_own_key(self, index: int, key: bytes) -> None:
        """Our key and index, for every publishing connection (open, opening or later)."""
        self.keys.use_own_key(index, key)

    # ------------------------------------------------------------------ stats
    def remote_stats(self) -> dict[str, ParticipantStats]:
        """Per remote identity, the connection's counters where its media arrives.

        A participant seen on several SFUs is reported from the one with most frames.
        """
        out: dict[str, ParticipantStats] = {}
        for conn in self.connections.values():
            for identity, stats in conn.stats.items():
                best = out.get(identity)
                if best is None or stats.video_frames > best.video_frames:
                    out[identity] = stats
        return out
