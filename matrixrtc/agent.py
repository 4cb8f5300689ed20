"""CallAgent: one device's presence in one room's MatrixRTC call.

``async with CallAgent(hs, room_id, AgentConfig(...)) as agent`` joins the room call (slot
``m.call#ROOM``) and keeps the membership alive until the block ends, then leaves cleanly.

Inputs: the homeserver adapter's room sync (:class:`matrixrtc.matrix.Homeserver`), fed into
the pure :class:`matrixrtc.session.rtc_session.RTCSession` (active memberships, order,
expiry, sticky-over-state precedence). Outputs: the ordered participant list
(:attr:`CallAgent.participants`), a stream of changes (:meth:`CallAgent.changes`), and the
own membership on the homeserver.

Own membership (spec/matrixrtc.md §2.3, js-sdk ``MembershipManager`` constants by default):

1. schedule the delayed leave (``{}`` at our state key, or the sticky leave content) and hold
   its delay id — cancelling an older one first; without MSC4140 the agent joins anyway;
2. send the join, then restart the delayed leave at once (older Synapse cancels delayed
   state overwritten by the same state);
3. restart it every ``restart_interval_ms``, each request bounded by
   ``min(restart_timeout_ms, expected_leave - now)``; network errors retry after
   ``network_retry_ms``, rate limits after ``retry_after_ms``; ``M_NOT_FOUND`` (it fired or
   was cancelled) goes back to 1;
4. refresh the state-form join at ``start + k * min(expires, 1 h) - 5 s`` with
   ``expires * (k + 1)`` and the original ``created_ts``; the sticky form is re-sent with a
   reference to the previous event before its stickiness runs out;
5. when our membership disappears from the room while we are in the call — the delayed
   leave fired (content ``{}``) or someone overwrote our ``_@…`` key — join again: a fresh
   membership after a fired leave (js-sdk behaviour), the same ``created_ts`` after an
   overwrite so our place in the order is kept;
6. leave: ``send`` the delayed leave now; if that fails, send the leave content directly.

Ring (§5): with ``ring=True``, when our join starts the call (we are its only member), send
one ``org.matrix.msc4075.rtc.notification`` referencing our membership event. Ringing ends
when a rung user declines (``org.matrix.msc4310.rtc.decline`` referencing it), when another
member joins, or when the lifetime passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import structlog

from matrixrtc.errors import LocalError, RemoteError
from matrixrtc.matrix import (
    DelayAction,
    DelayNotFound,
    DelayTooLong,
    Homeserver,
    HomeserverError,
    HomeserverUnreachable,
    RateLimited,
    Subscription,
    Unsupported,
)
from matrixrtc.matrix.homeserver import RoomUpdate
from matrixrtc.model import (
    CallMembership,
    Dialect,
    EventType,
    RtcDecline,
    RtcMemberData,
    RtcNotification,
    SessionMembershipData,
    Transport,
    state_key_for,
    sticky_leave_content,
)
from matrixrtc.session.rtc_session import MembershipChanges, RTCSession
from matrixrtc.session.transports import publish_transport

__all__ = [
    "AgentConfig",
    "CallAgent",
    "Participant",
    "ParticipantsChanged",
    "RingState",
    "participants_table",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")
JsonDict = dict[str, Any]

# js-sdk: the expiry refresh happens this long before the membership would expire, and at
# most hourly; sticky events live at most an hour (MSC4354).
_EXPIRY_HEADROOM_MS: Final = 5_000
_MAX_REFRESH_PERIOD_MS: Final = 3_600_000
_MAX_STICKY_MS: Final = 3_600_000


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """How the agent joins. Defaults are js-sdk's (spec/matrixrtc.md §2.2)."""

    intent: str | None = None  # "m.call.intent": "audio" | "video"
    transports: tuple[Transport, ...] = ()  # advertised; [0] is where we publish
    dialect: Dialect = Dialect.STATE  # STICKY needs MSC4354 on the homeserver
    multi_sfu: bool = True  # state form focus_selection (EC compatibility mode)
    ring: bool = False  # send a ring notification if we start the call
    ring_lifetime_ms: int = 30_000
    delayed_leave_ms: int = 8_000
    restart_interval_ms: int = 5_000
    restart_timeout_ms: int = 2_000
    expires_ms: int = 14_400_000
    network_retry_ms: int = 1_000
    sticky_duration_ms: int = _MAX_STICKY_MS


class RingState(StrEnum):
    IDLE = "idle"  # not asked to ring, or the call already had members
    RINGING = "ringing"
    DECLINED = "declined"
    ANSWERED = "answered"  # someone else joined
    EXPIRED = "expired"  # lifetime passed


@dataclass(frozen=True, slots=True)
class Participant:
    """One active membership as the agent shows it."""

    user_id: str
    device_id: str
    member_id: str
    dialect: Dialect
    created_ts: int
    event_id: str
    intent: str | None
    transport: Transport | None  # where it publishes (§3.2, given the oldest member)
    rtc_backend_identity: str
    is_self: bool

    @staticmethod
    def of(m: CallMembership, oldest: CallMembership | None, me: tuple[str, str]) -> Participant:
        return Participant(
            user_id=m.sender,
            device_id=m.device_id,
            member_id=m.member_id,
            dialect=m.dialect,
            created_ts=m.created_ts,
            event_id=m.event_id,
            intent=m.intent,
            transport=publish_transport(m, oldest),
            rtc_backend_identity=m.rtc_backend_identity,
            is_self=(m.sender, m.device_id) == me,
        )


@dataclass(frozen=True, slots=True)
class ParticipantsChanged:
    """The participant list after a change, oldest first, with what changed."""

    participants: tuple[Participant, ...]
    joined: tuple[Participant, ...] = ()
    left: tuple[Participant, ...] = ()
    ring: RingState = RingState.IDLE

    @property
    def oldest(self) -> Participant | None:
        return self.participants[0] if self.participants else None


def _wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class _Own:
    """Our membership as sent, and what the room showed us of it."""

    state_key: str | None = None  # state form
    member_id: str | None = None  # sticky form: per-join id
    delay_id: str | None = None  # a secret: never logged
    expected_leave_mono: float = 0.0
    created_ts: int | None = None  # first join's origin_server_ts, carried on refresh
    event_id: str | None = None  # our latest membership event id (sticky relation, ring)
    seen: bool = False  # the room has shown our current membership
    joined_mono: float = 0.0
    refreshes: int = 0
    delayed_supported: bool = True


class CallAgent:
    """See the module docstring."""

    def __init__(
        self,
        hs: Homeserver,
        room_id: str,
        config: AgentConfig | None = None,
        *,
        clock_ms: Callable[[], int] = _wall_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hs = hs
        self.room_id = room_id
        self.config = config or AgentConfig()
        self._clock_ms = clock_ms
        self._mono = monotonic
        self._session = RTCSession(room_id)
        self._own = _Own()
        self._participants: tuple[Participant, ...] = ()
        self._subs: set[Subscription[ParticipantsChanged]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._rejoin = asyncio.Event()
        self._rejoin_fresh = False
        self._wake = asyncio.Event()
        self._in_call = False
        self._leaving = False
        self._left = asyncio.Event()
        self._own_present = asyncio.Event()
        self._ring = RingState.IDLE
        self._ring_sent = False
        self._ring_deadline_ms: int | None = None
        self.notification_event_id: str | None = None
        self._ring_ended = asyncio.Event()
        self._updates: Subscription[RoomUpdate] | None = None
        self._log = log.bind(room_id=room_id, user_id=hs.user_id, device_id=hs.device_id)
        self.rejoins = 0
        self.heartbeats = 0

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self.config.dialect is Dialect.STICKY and not await self.hs.supports(
            "org.matrix.msc4354"
        ):
            raise LocalError("sticky dialect asked for, but the homeserver lacks MSC4354")
        self._updates = self.hs.room_updates()
        # Seed from what the adapter already holds; later updates come from the subscription
        # (taken first, with no await in between, so nothing is missed).
        self._seed()
        self._spawn(self._room_loop(), "room")
        self._spawn(self._timer_loop(), "timers")
        self._in_call = True
        self._spawn(self._membership_loop(), "membership")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._in_call:
                await self.leave()
        finally:
            await self._stop_tasks()
            if self._updates is not None:
                self._updates.close()
            for sub in list(self._subs):
                sub._end(None)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("agent.task_failed", task=name)
                raise

        self._tasks.append(asyncio.create_task(run(), name=f"agent {name} {self.hs.user_id}"))

    async def _stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise RemoteError(f"call agent task failed: {errors[0]!r}") from errors[0]

    # -- public view ------------------------------------------------------------------------

    @property
    def participants(self) -> tuple[Participant, ...]:
        """Active members, oldest first (ours included once the room shows it)."""
        return self._participants

    @property
    def oldest(self) -> Participant | None:
        return self._participants[0] if self._participants else None

    @property
    def ring_state(self) -> RingState:
        return self._ring

    @property
    def membership_state_key(self) -> str | None:
        return self._own.state_key

    def changes(self) -> Subscription[ParticipantsChanged]:
        """Subscribe to participant-list changes (also ring-state changes)."""
        return Subscription(self._subs)

    async def wait_joined(self, timeout_s: float = 10.0) -> None:
        """Until the room shows our own membership."""
        await asyncio.wait_for(self._own_present.wait(), timeout_s)

    async def wait_ring_ended(self, timeout_s: float | None = None) -> RingState:
        await asyncio.wait_for(self._ring_ended.wait(), timeout_s)
        return self._ring

    async def leave(self) -> None:
        """Leave the call now (idempotent); the context exit does this too."""
        if not self._in_call:
            return
        self._leaving = True
        self._in_call = False
        for t in self._tasks:
            if t.get_name().startswith("agent membership"):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        await self._send_leave()
        self._stop_ringing(RingState.IDLE)
        self._left.set()

    # -- room input -------------------------------------------------------------------------

    def _seed(self) -> None:
        state = self.hs.room_state(self.room_id)
        create = state.get((EventType.ROOM_CREATE, ""))
        if create is not None:
            self._set_room_version(create)
        for (etype, _), ev in state.items():
            self._apply_state(etype, ev)
        for ev, received_ms in self.hs.room_sticky(self.room_id):
            if ev.get("type") == EventType.RTC_MEMBER:
                self._session.receive_sticky_event(ev, received_ms)
        self._recompute()

    def _set_room_version(self, create: Mapping[str, Any]) -> None:
        content = create.get("content")
        version = content.get("room_version") if isinstance(content, dict) else None
        self._session.set_room_version(version if isinstance(version, str) else "1")

    def _apply_state(self, etype: object, ev: Mapping[str, Any]) -> None:
        if etype == EventType.CALL_MEMBER:
            self._session.receive_state_event(ev)
        elif etype == EventType.ROOM_MEMBER:
            self._session.receive_member_event(ev)
        elif etype == EventType.ROOM_CREATE:
            self._set_room_version(ev)

    async def _room_loop(self) -> None:
        assert self._updates is not None
        async for update in self._updates:
            if update.room_id != self.room_id:
                continue
            if update.left:
                self._log.warning("agent.room_left")
                self._session.set_joined_members(())
            self._apply_update(update)

    def _apply_update(self, update: RoomUpdate) -> None:
        now = self._clock_ms()
        for ev in update.state:
            self._apply_state(ev.get("type"), ev)
        for ev in update.sticky:
            if ev.get("type") == EventType.RTC_MEMBER:
                self._session.receive_sticky_event(ev, now)
        for ev in update.timeline:
            etype = ev.get("type")
            if etype == "m.room.redaction":
                content = ev.get("content")
                redacts = ev.get("redacts") or (
                    content.get("redacts") if isinstance(content, dict) else None
                )
                if isinstance(redacts, str):
                    self._session.receive_redaction(redacts)
            elif etype == EventType.RTC_DECLINE:
                self._on_decline(ev)
        self._recompute()

    def _recompute(self) -> None:
        changes = self._session.update(self._clock_ms())
        self._check_own()
        if changes is not None:
            self._publish(changes)
        self._wake.set()

    def _publish(self, changes: MembershipChanges) -> None:
        me = (self.hs.user_id, self.hs.device_id)
        oldest = changes.memberships[0] if changes.memberships else None
        parts = tuple(Participant.of(m, oldest, me) for m in changes.memberships)
        prev = {(p.user_id, p.device_id, p.member_id): p for p in self._participants}
        now = {(p.user_id, p.device_id, p.member_id): p for p in parts}
        joined = tuple(p for k, p in now.items() if k not in prev)
        left = tuple(p for k, p in prev.items() if k not in now)
        self._participants = parts
        self._ring_after_change(changes)
        if joined or left or [p.event_id for p in parts] != [p.event_id for p in prev.values()]:
            self._emit(ParticipantsChanged(parts, joined, left, self._ring))

    def _emit(self, event: ParticipantsChanged) -> None:
        for sub in list(self._subs):
            sub._put(event)

    def _own_membership(self) -> CallMembership | None:
        m = self._session.own_membership(self.hs.user_id, self.hs.device_id)
        if m is None:
            return None
        if self.config.dialect is Dialect.STICKY:
            ok = isinstance(m.data, RtcMemberData) and m.member_id == self._own.member_id
        else:
            ok = m.dialect is Dialect.STATE and m.state_key == self._own.state_key
        return m if ok else None

    def _check_own(self) -> None:
        if not self._in_call or self._leaving:
            return
        own = self._own_membership()
        if own is not None:
            if not self._own.seen:
                self._log.info("agent.joined", created_ts=own.created_ts)
            self._own.seen = True
            self._own.event_id = own.event_id
            if self._own.created_ts is None:
                self._own.created_ts = own.created_ts
            self._own_present.set()
            return
        if not self._own.seen:
            return  # our join has not come back from the homeserver yet
        self._own.seen = False
        self._own_present.clear()
        fired = self._own_content_is_leave()
        self._log.warning(
            "agent.membership_lost", reason="leave fired" if fired else "overwritten or expired"
        )
        self._rejoin_fresh = fired
        self._rejoin.set()

    def _own_content_is_leave(self) -> bool:
        if self.config.dialect is Dialect.STATE and self._own.state_key is not None:
            ev = self.hs.room_state(self.room_id).get((EventType.CALL_MEMBER, self._own.state_key))
            content = ev.get("content") if ev is not None else None
            return content == {}
        return True  # sticky: only our own leave event can replace our sticky key

    # -- own membership ---------------------------------------------------------------------

    async def _membership_loop(self) -> None:
        fresh = True
        while True:
            await self._join(fresh=fresh)
            await self._heartbeat()
            # The heartbeat returns when our membership must be sent again.
            fresh = self._rejoin_fresh
            self.rejoins += 1

    def _join_content(self) -> tuple[JsonDict, str | None]:
        cfg, own = self.config, self._own
        if cfg.dialect is Dialect.STICKY:
            assert own.member_id is not None
            data = RtcMemberData.for_join(
                user_id=self.hs.user_id,
                device_id=self.hs.device_id,
                member_id=own.member_id,
                transports=cfg.transports,
                intent=cfg.intent,
                previous_event_id=own.event_id if own.seen or own.refreshes else None,
            )
            return data.to_json(), None
        expires = cfg.expires_ms * (own.refreshes + 1)
        state = SessionMembershipData.for_join(
            user_id=self.hs.user_id,
            device_id=self.hs.device_id,
            transports=cfg.transports,
            multi_sfu=cfg.multi_sfu,
            intent=cfg.intent,
            expires=expires,
            created_ts=own.created_ts,
        )
        return state.to_json(), own.state_key

    def _leave_content(self) -> JsonDict:
        if self.config.dialect is Dialect.STICKY:
            assert self._own.member_id is not None
            return sticky_leave_content(self._own.member_id)
        return {}

    async def _join(self, *, fresh: bool) -> None:
        own = self._own
        if fresh:
            own.created_ts = None
            own.refreshes = 0
            own.event_id = None
            own.member_id = str(uuid.uuid4())
        if own.state_key is None:
            create = self.hs.room_state(self.room_id).get((EventType.ROOM_CREATE, ""))
            content = create.get("content") if create is not None else None
            version = content.get("room_version") if isinstance(content, dict) else None
            own.state_key = state_key_for(
                self.hs.user_id, self.hs.device_id, version if isinstance(version, str) else "1"
            )
        self._rejoin.clear()
        await self._schedule_delayed_leave()
        await self._send_join()
        own.joined_mono = self._mono()
        if own.delay_id is not None:
            await self._restart_once()  # older Synapse cancels it on our own overwrite

    async def _schedule_delayed_leave(self) -> None:
        own, cfg = self._own, self.config
        if not own.delayed_supported:
            return
        if own.delay_id is not None:
            old, own.delay_id = own.delay_id, None
            with contextlib.suppress(RemoteError):
                await self.hs.update_delayed(old, DelayAction.CANCEL)
        delay = cfg.delayed_leave_ms
        while True:
            try:
                if cfg.dialect is Dialect.STICKY:
                    own.delay_id = await self.hs.schedule_delayed_sticky(
                        self.room_id,
                        EventType.RTC_MEMBER,
                        self._leave_content(),
                        delay,
                        cfg.sticky_duration_ms,
                    )
                else:
                    assert own.state_key is not None
                    own.delay_id = await self.hs.schedule_delayed_state(
                        self.room_id, EventType.CALL_MEMBER, own.state_key, {}, delay
                    )
                own.expected_leave_mono = self._mono() + delay / 1000
                return
            except Unsupported:
                self._log.warning("agent.no_delayed_events", reason="MSC4140 not advertised")
                own.delayed_supported = False
                return
            except DelayTooLong as e:
                if e.max_delay_ms is None or e.max_delay_ms >= delay:
                    self._log.warning("agent.delay_rejected", delay_ms=delay)
                    return
                delay = e.max_delay_ms
            except RemoteError as e:
                if not await self._retry_wait(e):
                    self._log.warning("agent.delayed_leave_failed", error=str(e))
                    return

    async def _send_join(self) -> None:
        own, cfg = self._own, self.config
        while True:
            content, state_key = self._join_content()
            try:
                if cfg.dialect is Dialect.STICKY:
                    own.event_id = await self.hs.send_sticky(
                        self.room_id, EventType.RTC_MEMBER, content, cfg.sticky_duration_ms
                    )
                else:
                    assert state_key is not None
                    own.event_id = await self.hs.put_state(
                        self.room_id, EventType.CALL_MEMBER, state_key, content
                    )
                self._log.info("agent.join_sent", refresh=own.refreshes, dialect=cfg.dialect.value)
                return
            except RemoteError as e:
                if not await self._retry_wait(e):
                    raise

    async def _retry_wait(self, error: RemoteError) -> bool:
        """Sleep before retrying a transient failure; False if it is not worth retrying."""
        if isinstance(error, RateLimited):
            await asyncio.sleep((error.retry_after_ms or 5_000) / 1000)
            return True
        if isinstance(error, HomeserverUnreachable) or (
            isinstance(error, HomeserverError) and error.transient
        ):
            await asyncio.sleep(self.config.network_retry_ms / 1000)
            return True
        return False

    async def _restart_once(self) -> bool:
        """One bounded restart; False when the delayed event is gone (M_NOT_FOUND)."""
        own, cfg = self._own, self.config
        assert own.delay_id is not None
        left_s = own.expected_leave_mono - self._mono()
        timeout_s = max(0.1, min(cfg.restart_timeout_ms / 1000, left_s))
        while True:
            try:
                await self.hs.update_delayed(own.delay_id, DelayAction.RESTART, timeout_s=timeout_s)
            except DelayNotFound:
                own.delay_id = None
                return False
            except RemoteError as e:
                if self._mono() >= own.expected_leave_mono:
                    self._log.warning("agent.probably_left", error=str(e))
                if isinstance(e, RateLimited):
                    await asyncio.sleep((e.retry_after_ms or 5_000) / 1000)
                elif isinstance(e, HomeserverUnreachable) and "Timeout" in str(e):
                    pass  # a local abort: js-sdk retries at once
                else:
                    await asyncio.sleep(cfg.network_retry_ms / 1000)
                timeout_s = cfg.restart_timeout_ms / 1000
                continue
            own.expected_leave_mono = self._mono() + cfg.delayed_leave_ms / 1000
            self.heartbeats += 1
            return True

    async def _heartbeat(self) -> None:
        own, cfg = self._own, self.config
        refresh_base = own.joined_mono
        # A restart period at or above the delay would let the leave fire between restarts;
        # keep js-sdk's ratio (5 s for 8 s) as the ceiling.
        interval_s = min(cfg.restart_interval_ms, cfg.delayed_leave_ms * 5 // 8) / 1000
        while True:
            next_restart = self._mono() + interval_s
            while True:
                now = self._mono()
                wait = min(next_restart, refresh_base + self._refresh_offset_s()) - now
                if wait <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rejoin.wait(), wait)
                if self._rejoin.is_set():
                    return
            if self._mono() >= refresh_base + self._refresh_offset_s():
                own.refreshes += 1
                await self._send_join()
                continue
            if own.delay_id is None:
                continue  # joined without delayed events: only refreshes are due
            if not await self._restart_once():
                self._log.info("agent.delayed_leave_gone")
                self._rejoin_fresh = self._own_content_is_leave()
                return

    def _refresh_offset_s(self) -> float:
        own, cfg = self._own, self.config
        if cfg.dialect is Dialect.STICKY:
            period = min(cfg.sticky_duration_ms, _MAX_STICKY_MS)
        else:
            period = min(cfg.expires_ms, _MAX_REFRESH_PERIOD_MS)
        return ((own.refreshes + 1) * period - _EXPIRY_HEADROOM_MS) / 1000

    async def _send_leave(self) -> None:
        own = self._own
        if own.delay_id is not None:
            delay_id, own.delay_id = own.delay_id, None
            try:
                await self.hs.update_delayed(delay_id, DelayAction.SEND)
                self._log.info("agent.left", via="delayed_send")
                return
            except RemoteError as e:
                self._log.info("agent.delayed_send_failed", error=str(e))
        try:
            if self.config.dialect is Dialect.STICKY:
                await self.hs.send_sticky(
                    self.room_id,
                    EventType.RTC_MEMBER,
                    self._leave_content(),
                    self.config.sticky_duration_ms,
                )
            elif own.state_key is not None:
                await self.hs.put_state(self.room_id, EventType.CALL_MEMBER, own.state_key, {})
            self._log.info("agent.left", via="direct")
        except RemoteError as e:
            self._log.warning("agent.leave_failed", error=str(e))

    # -- timers -----------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            self._wake.clear()
            deadlines = [
                t for t in (self._session.next_wakeup_ms(), self._ring_deadline_ms) if t is not None
            ]
            now = self._clock_ms()
            timeout = None if not deadlines else max(0.0, (min(deadlines) - now) / 1000) + 0.01
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if self._wake.is_set():
                continue
            if self._ring_deadline_ms is not None and self._clock_ms() >= self._ring_deadline_ms:
                self._stop_ringing(RingState.EXPIRED)
            self._recompute()
            if self._session.next_wakeup_ms() == min(deadlines, default=None):
                await asyncio.sleep(0.05)  # an expiry in the past: avoid a hot loop

    # -- ring -------------------------------------------------------------------------------

    def _ring_after_change(self, changes: MembershipChanges) -> None:
        if self._ring is RingState.RINGING:
            others = [m for m in changes.memberships if m.sender != self.hs.user_id]
            if others:
                self._stop_ringing(RingState.ANSWERED, emit=False)
            return
        if not self.config.ring or self._ring_sent:
            return
        own = self._own_membership()
        if own is not None and changes.session_started and changes.memberships == (own,):
            self._ring_sent = True
            self._spawn(self._send_ring(own), "ring")

    async def _send_ring(self, own: CallMembership) -> None:
        note = RtcNotification.ring(
            membership_event_id=own.event_id,
            sender_ts=self._clock_ms(),
            intent=self.config.intent,
            lifetime=self.config.ring_lifetime_ms,
        )
        self.notification_event_id = await self.hs.send_event(
            self.room_id, EventType.RTC_NOTIFICATION, note.to_json()
        )
        self._ring = RingState.RINGING
        self._ring_deadline_ms = note.sender_ts + note.effective_lifetime_ms
        self._log.info("agent.ringing", lifetime_ms=note.effective_lifetime_ms)
        self._emit(ParticipantsChanged(self._participants, ring=self._ring))
        self._wake.set()

    def _on_decline(self, ev: Mapping[str, Any]) -> None:
        if self._ring is not RingState.RINGING or ev.get("sender") == self.hs.user_id:
            return
        decline = RtcDecline.from_json(ev.get("content"))
        if decline is not None and decline.notification_event_id == self.notification_event_id:
            self._log.info("agent.ring_declined", by=ev.get("sender"))
            self._stop_ringing(RingState.DECLINED)

    def _stop_ringing(self, state: RingState, *, emit: bool = True) -> None:
        if self._ring is not RingState.RINGING:
            return
        self._ring = state
        self._ring_deadline_ms = None
        self._ring_ended.set()
        if emit:
            self._emit(ParticipantsChanged(self._participants, ring=state))


def participants_table(participants: Iterable[Participant]) -> str:
    """A fixed-width table of the participants, oldest first."""
    rows = [("#", "user", "device", "form", "created_ts", "transport", "")]
    for i, p in enumerate(participants):
        t = p.transport.to_json() if p.transport is not None else None
        where = "-"
        if t is not None:
            where = str(t.get("livekit_service_url") or t.get("type"))
        rows.append(
            (
                str(i),
                p.user_id,
                p.device_id,
                p.dialect.value,
                str(p.created_ts),
                where,
                "(you)" if p.is_self else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
