"""CallAgent: one device's presence in one room's MatrixRTC call.

``async with CallAgent(hs, room_id, AgentConfig(...)) as agent`` joins the room call (slot
``m.call#ROOM``) and keeps the membership alive until the block ends, then leaves cleanly.

Inputs: the homeserver adapter's room sync (:class:`matrixrtc.matrix.Homeserver`), fed into
the pure :class:`matrixrtc.session.rtc_session.RTCSession` (active memberships, order,
expiry, sticky-over-state precedence). Outputs: the ordered participant list
(:attr:`CallAgent.participants`), a stream of changes (:meth:`CallAgent.changes`), and the
own membership on the homeserver.

Own membership: the core's sans-I/O :class:`~matrixrtc.session.membership_machine.
OwnMembershipMachine` (js-sdk ``MembershipManager``: delayed leave, join, restart every
``restart_interval_ms``, hourly expiry refresh, re-join when our membership goes missing,
leave via ``send`` of the delayed leave) decides; this module performs its requests on the
homeserver, maps the answers to its result types and feeds it what the room shows of our
membership (:meth:`~matrixrtc.session.membership_machine.MembershipConfig.for_timings` maps
the timings: the restart period is capped at 5/8 of the delay).

The machine gives up after ``network_retries`` failures of one step (a homeserver away for
longer than that; a request that only timed out, a slow homeserver, never counts). The agent
does not: while it is still meant to be in the call (:attr:`CallAgent.in_call`) it waits
with backoff until the homeserver answers ``/versions`` and joins again from the first step
(the old delayed leave is cancelled first), logging ``agent.rejoin_scheduled`` and
``agent.rejoining``. :meth:`CallAgent.leave` during that wait,
or after any failure, still sends the leave.

Ring (§5, js-sdk 43): with ``ring=True``, when our join starts the call (we are its only
member), open the slot if needed and send one ``org.matrix.msc4075.rtc.notification`` (sticky,
keyed by the slot) referencing our membership event. It rings the room (``m.mentions.room``)
and names the rung users (the other joined room members at that moment). Ringing ends when
every rung user has declined (``org.matrix.msc4310.rtc.decline`` referencing it), when
another member joins, or when the lifetime passes; the logic is the pure
:class:`matrixrtc.session.ring.OutgoingRing`. With ``leave_when_ring_unanswered`` the agent
then leaves the call after a decline or an expiry, as Element Call's caller does. Rings
addressed to us that pass js-sdk 43's receiving rules land in :attr:`CallAgent.incoming_rings`;
:meth:`CallAgent.decline` declines one.

Dialects: every agent reads all three membership forms: the state form, the sticky form, and
the 2022 MSC3401 form of Hydrogen and legacy js-sdk ``GroupCall`` (one
``org.matrix.msc3401.call`` per call, ``m.calls`` entries per user; pure in
:mod:`matrixrtc.session.legacy_call`). A device listed only there is a participant with
``dialect`` MSC3401_2022, its own session id, the mesh as its only transport. What we write:
``dialect`` STATE or STICKY (the membership machine above), MSC3401_2022 (only our entry in
the room's 2022 call, created if the room has none: read-modify-write, renewed before its
1 h expiry, put back when lost, removed on leave; no delayed leave exists in that form), or
``auto_dialect`` (:func:`~matrixrtc.session.legacy_call.plan_write`: 2022 only when every
other member is 2022-only, else the current dialect most others use, plus an entry in the
2022 call, under the same session id, once a 2022-only member is there, because legacy
js-sdk sends media only to members it finds in ``m.calls``).

Slots (``org.matrix.msc4143.rtc.slot``): the agent refuses to join a closed slot (LocalError
naming it; the join CLI prints it), and in the sticky dialect opens an absent one first,
keeping any other content (js-sdk ``ensureRtcSlotOpen``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import structlog

from matrixrtc.errors import LocalError, MatrixRTCError
from matrixrtc.matrix import (
    Broadcaster,
    DelayAction,
    DelayNotFound,
    DelayTooLong,
    DeviceRef,
    Homeserver,
    HomeserverError,
    HomeserverTimeout,
    HomeserverUnreachable,
    RateLimited,
    Subscription,
    Unsupported,
)
from matrixrtc.matrix.types import RoomUpdate
from matrixrtc.matrix.wire import now_ms
from matrixrtc.model import (
    CallMembership,
    Dialect,
    EventType,
    RtcDecline,
    RtcNotification,
    Transport,
    msc4354,
)
from matrixrtc.model.livekit_ids import legacy_identity, livekit_identity
from matrixrtc.model.notification import DECLINE_STICKY_MS
from matrixrtc.model.slot import SLOT_ENCRYPTION_PER_MEMBER, SlotStatus, open_slot_content
from matrixrtc.session import membership_machine as mm
from matrixrtc.session.legacy_call import PutState
from matrixrtc.session.legacy_entry import DIALECT_CHOICES, OwnLegacyEntry, dialect_choice
from matrixrtc.session.own_state import CHECK_AFTER_MS, OwnStateWatch, at_own_key, resolved_differs
from matrixrtc.session.participants import (
    Participant,
    ParticipantsChanged,
    participant_changes,
    participants_of,
    participants_table,
)
from matrixrtc.session.ring import OutgoingRing, RingState, judge_notification
from matrixrtc.session.rtc_session import MembershipChanges, RTCSession
from matrixrtc.session.server_clock import ServerClock
from matrixrtc.tasks import OwnedTasks, first_of

_MAX_MENTIONS = 100  # rung users named in a ring's m.mentions (bigger rooms: the room only)

__all__ = [
    "DIALECT_CHOICES",
    "AgentConfig",
    "CallAgent",
    "Participant",
    "ParticipantsChanged",
    "RingState",
    "dialect_choice",
    "participants_table",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")
JsonDict = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """How the agent joins. Defaults are js-sdk's (spec/matrixrtc.md §2.2)."""

    intent: str | None = None  # "m.call.intent": "audio" | "video"
    transports: tuple[Transport, ...] = ()  # advertised; [0] is where we publish
    # STATE, STICKY (falls back to STATE without MSC4354) or MSC3401_2022 (m.calls only).
    dialect: Dialect = Dialect.STATE
    # Choose the form(s) from the call's other members when joining
    # (:func:`~matrixrtc.session.legacy_call.plan_write`); ``dialect`` is then ignored.
    auto_dialect: bool = False
    multi_sfu: bool = True  # state form focus_selection (EC compatibility mode)
    ring: bool = False  # send a ring notification if we start the call
    ring_lifetime_ms: int = 30_000
    # Element Call's caller: leave when every rung user declined or the lifetime passed
    # with nobody joining.
    leave_when_ring_unanswered: bool = False
    delayed_leave_ms: int = 8_000
    restart_interval_ms: int = 5_000
    restart_timeout_ms: int = 2_000
    expires_ms: int = 14_400_000
    network_retry_ms: int = 1_000
    network_retries: int = 10  # per step, before the membership machine gives up
    sticky_duration_ms: int = msc4354.MAX_STICKY_DURATION_MS
    # After the machine gave up while we are still meant to be in the call (a long outage):
    # join again, first after this long, doubling up to the maximum while the homeserver
    # does not answer.
    rejoin_backoff_ms: int = 1_000
    rejoin_max_backoff_ms: int = 30_000
    # After a leave that abandoned a join on the wire: a delayed leave this long overwrites
    # the join should it land late (MembershipConfig.late_join_sweep_ms).
    late_join_sweep_ms: int = 30_000


async def _wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Whether ``event`` got set within ``timeout_s``.

    Uses ``asyncio.timeout``, not ``wait_for``: on Python 3.11 ``wait_for`` can swallow a
    cancellation that coincides with the event being set, and a loop built on it then never
    stops (seen as a hung agent shutdown).
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


class CallAgent:
    """See the module docstring."""

    def __init__(
        self,
        hs: Homeserver,
        room_id: str,
        config: AgentConfig | None = None,
        *,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.hs = hs
        self.room_id = room_id
        self.config = config or AgentConfig()
        self._clock_ms = clock_ms
        self._session = RTCSession(room_id)
        self._server_clock = ServerClock()
        self._machine: mm.OwnMembershipMachine | None = None
        self._own_watch = OwnStateWatch()
        self._poke = asyncio.Event()  # new input for the machine (observation, leave)
        self._stopped = asyncio.Event()  # the drive loop ended (left, or it crashed)
        self._leaving = asyncio.Event()  # leave() was called: ends a recovery wait
        self._rejoin_delay_ms = self.config.rejoin_backoff_ms
        self._recoveries = 0
        self._joins_sent = 0
        self._participants: tuple[Participant, ...] = ()
        self._changes: Broadcaster[ParticipantsChanged] = Broadcaster()
        self._tasks = OwnedTasks(f"agent {hs.user_id}", log, event_prefix="agent")
        self._wake = asyncio.Event()
        self._in_call = False
        self._own_present = asyncio.Event()
        # /sync request numbers (RoomUpdate.sync_request): of the update being applied, and the
        # last request sent before our latest join was acknowledged.
        self._update_sync_request = 0
        self._join_acked_sync_request: int | None = None
        self._ring = OutgoingRing(self.hs.user_id)
        # Valid ring notifications addressed to us (js-sdk 43's receiving rules), by event id.
        self.incoming_rings: dict[str, RtcNotification] = {}
        self._ring_ended = asyncio.Event()
        self._updates: Subscription[RoomUpdate] | None = None
        self._log = log.bind(room_id=room_id, user_id=hs.user_id, device_id=hs.device_id)
        self.heartbeats = 0
        self._left_reason: str | None = None
        # Devices our sticky membership was re-sent for (see _resend_for_new_devices).
        self._resent_for: set[DeviceRef] = set()
        # The room's 2022 call (read in every dialect) and our entry in it, if we write one.
        self._legacy = OwnLegacyEntry(room_id, hs.user_id, hs.device_id)
        self._legacy_puts: list[PutState] = []
        self._legacy_poke = asyncio.Event()
        self._legacy_lock = asyncio.Lock()

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self.config.auto_dialect or self.config.dialect is Dialect.MSC3401_2022:
            # A room joined just now shows its state only with a later sync: without it we
            # would miss the room's 2022 call and start a second one.
            while (EventType.ROOM_CREATE, "") not in self.hs.room_state(self.room_id):
                await self.hs.wait_synced(timeout_s=30.0)
        self._updates = self.hs.room_updates()
        # Seed from what the adapter already holds; later updates come from the subscription
        # (taken first, with no await in between, so nothing is missed).
        self._seed()
        if self.config.auto_dialect:
            dialect = self._legacy.plan(self._others_dialects())
            self.config = replace(self.config, dialect=dialect)
        if self.config.dialect is Dialect.STICKY and not await self.hs.supports(
            msc4354.UNSTABLE_FEATURE
        ):
            # Sticky only where it can work; the state form is what every client reads.
            self._log.warning("agent.sticky_unsupported", fallback=Dialect.STATE.value)
            self.config = replace(self.config, dialect=Dialect.STATE)
        self._spawn(self._legacy_loop(), "legacy-membership")
        if self.config.dialect is Dialect.MSC3401_2022:
            self._queue_legacy(self._legacy.join_2022(self._clock_ms(), intent=self.config.intent))
            self._in_call = True
            self._spawn(self._room_loop(), "room")
            self._spawn(self._timer_loop(), "timers")
            self._recompute()
            return self
        await self._respect_slot()
        self._machine = self._new_machine()
        self._own_watch = OwnStateWatch()
        self._machine.join(
            self._clock_ms(),
            transports=self.config.transports,
            intent=self.config.intent,
            multi_sfu=self.config.multi_sfu,
        )
        self._in_call = True
        self._spawn(self._room_loop(), "room")
        self._spawn(self._timer_loop(), "timers")
        self._spawn(self._drive(), "membership")
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
            elif self._legacy_puts:
                await self._flush_legacy()
            elif self._machine is not None and self._machine.running:
                # A leave already under way (e.g. the ring went unanswered): let it finish.
                await _wait_event(self._stopped, 10.0)
        finally:
            await self._tasks.aclose()
            if self._updates is not None:
                self._updates.close()
            self._changes.end()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)

    # -- public view ------------------------------------------------------------------------

    @property
    def participants(self) -> tuple[Participant, ...]:
        """Active members, oldest first (ours included once the room shows it)."""
        return self._participants

    @property
    def oldest(self) -> Participant | None:
        return self._participants[0] if self._participants else None

    @property
    def memberships(self) -> tuple[CallMembership, ...]:
        """The parsed active memberships behind :attr:`participants`, same order."""
        return self._session.memberships

    @property
    def ring_state(self) -> RingState:
        return self._ring.state

    @property
    def notification_event_id(self) -> str | None:
        """Our ring notification's event id, once sent."""
        return self._ring.notification_event_id

    @property
    def membership_state_key(self) -> str | None:
        if self._machine is None and self._legacy.write is not None:
            return self.hs.user_id  # the 2022 form: one event per user
        return self._machine.state_key if self._machine is not None else None

    @property
    def legacy_conf_id(self) -> str | None:
        """The conf_id of the room's 2022 call while we are listed in it, else None."""
        return self._legacy.written_conf_id

    @property
    def mesh_session_id(self) -> str | None:
        """Our MSC2746 session id (what our participant entry shows), once the room shows
        our membership."""
        me = next((p for p in self._participants if p.is_self), None)
        return None if me is None else me.mesh_session_id

    @property
    def in_call(self) -> bool:
        """Whether we mean to be in the call: from entering until :meth:`leave`, also while
        the membership is being restored after a homeserver outage."""
        return self._in_call

    @property
    def membership_status(self) -> mm.MembershipStatus:
        """Our own membership's state (connecting, connected, reconnecting, failed, ...)."""
        if self._machine is None:
            if self._legacy.write is not None and self._in_call:
                if self._own_present.is_set():
                    return mm.MembershipStatus.CONNECTED
                return mm.MembershipStatus.CONNECTING
            return mm.MembershipStatus.DISCONNECTED
        return self._machine.status

    @property
    def member_id(self) -> str:
        """Our membership's member id (sticky form: a UUID per agent; state form:
        ``user:device``; 2022 form: ``user:device``)."""
        if self._machine is None and self.config.dialect is Dialect.MSC3401_2022:
            return f"{self.hs.user_id}:{self.hs.device_id}"
        return self.machine.member_id

    @property
    def rtc_backend_identity(self) -> str:
        """Our LiveKit identity, as other members derive it from our membership (§4.5)."""
        if self.config.dialect is Dialect.STICKY:
            return livekit_identity(self.hs.user_id, self.hs.device_id, self.member_id)
        return legacy_identity(self.hs.user_id, self.hs.device_id)

    @property
    def recoveries(self) -> int:
        """How often the membership was joined again after the machine had given up."""
        return self._recoveries

    @property
    def machine(self) -> mm.OwnMembershipMachine:
        if self._machine is None:
            raise LocalError("the agent has not joined (use `async with CallAgent(...)`)")
        return self._machine

    def changes(self) -> Subscription[ParticipantsChanged]:
        """Subscribe to participant-list changes (also ring-state changes)."""
        return self._changes.subscribe()

    async def wait_joined(self, timeout_s: float = 10.0) -> None:
        """Until the room shows our own membership."""
        if not await _wait_event(self._own_present, timeout_s):
            raise TimeoutError("our membership did not appear in the room")

    def clock_moved(self) -> None:
        """The injected clock (``clock_ms``) jumped ahead: act on every deadline now due
        (ring lifetime, membership expiry) instead of at the wall-clock time."""
        self._wake.set()

    async def wait_ring_ended(self, timeout_s: float | None = None) -> RingState:
        if not await _wait_event(self._ring_ended, timeout_s):
            raise TimeoutError("the ring did not end")
        return self._ring.state

    async def leave(self, timeout_s: float = 10.0) -> None:
        """Leave the call now (idempotent); the context exit does this too.

        Also after the membership machine gave up (an outage): the leave still goes out, by
        sending the scheduled delayed leave now, else the leave content. A request on the
        wire when this is called (a hung homeserver) is abandoned, not waited for.
        """
        if not self._start_leave():
            return
        if self._machine is not None and not await _wait_event(self._stopped, timeout_s):
            self._log.warning("agent.leave_timed_out")
        try:
            async with asyncio.timeout(timeout_s):
                await self._flush_legacy()
        except TimeoutError:
            self._log.warning("agent.legacy_leave_timed_out")
        self._stop_ringing()

    def _start_leave(self) -> bool:
        """The part of :meth:`leave` that needs no waiting; False if not in the call."""
        if not self._in_call or (self._machine is None and self._legacy.write is None):
            return False
        self._in_call = False
        self._leaving.set()
        self._queue_legacy(self._legacy.leave(self._clock_ms()))
        if self._machine is None:
            return True
        self._machine.leave(self._clock_ms())
        if self._machine.running and self._stopped.is_set():
            # Nothing drives the machine any more (its loop ended): drive it for the leave.
            self._stopped.clear()
            self._spawn(self._drive(), "membership-leave")
        self._poke.set()
        return True

    @property
    def left_reason(self) -> str | None:
        """Why the agent left the call by itself (e.g. its slot was closed); None while in the
        call and after a leave that was asked for."""
        return self._left_reason

    # -- room input -------------------------------------------------------------------------

    def _seed(self) -> None:
        state = self.hs.room_state(self.room_id)
        self._session.receive_room_update(state=state.values(), now_ms=self._clock_ms())
        self._feed_legacy(state.values())
        for ev, received_ms in self.hs.room_sticky(self.room_id):
            self._session.receive_room_update(sticky=(ev,), now_ms=received_ms)
        self._recompute()

    async def _room_loop(self) -> None:
        assert self._updates is not None
        async for update in self._updates:
            if update.room_id != self.room_id:
                continue
            if update.left:
                self._log.warning("agent.room_left")
            self._apply_update(update)

    def _apply_update(self, update: RoomUpdate) -> None:
        self._update_sync_request = update.sync_request
        received = self._clock_ms()
        for ev in (*update.state, *update.timeline):
            self._server_clock.observe(ev, received)
        self._session.clock_offset_ms = self._server_clock.offset_ms
        slot_before = self._session.slot_status
        rest = self._session.receive_room_update(
            state=update.state,
            timeline=update.timeline,
            sticky=update.sticky,
            now_ms=self._clock_ms(),
            left=update.left,
        )
        self._feed_legacy(update.state)
        if slot_before is not SlotStatus.CLOSED and self._session.slot_status is SlotStatus.CLOSED:
            self._slot_closed()
        self._watch_own_state(update)
        in_timeline = {ev.get("event_id") for ev in update.timeline}
        for ev in update.sticky:
            # A decline whose Megolm key came after the event (held by the adapter, decrypted
            # in a later sync) arrives only as a sticky event: js-sdk files it once decrypted.
            if ev.get("type") == EventType.RTC_DECLINE and ev.get("event_id") not in in_timeline:
                self._on_decline(ev)
        for ev in rest:
            if ev.get("type") == EventType.RTC_DECLINE:
                self._on_decline(ev)
            elif ev.get("type") == EventType.RTC_NOTIFICATION:
                self._on_notification(ev)
        self._recompute()
        self._resend_for_new_devices()

    def _watch_own_state(self, update: RoomUpdate) -> None:
        """State form, homeserver without MSC4222 state_after: when the stream at our own
        key looks like a fork (our delayed leave fired and we re-joined), read the resolved
        current state at our key (matrixrtc.session.own_state)."""
        machine = self._machine
        key = machine.state_key if machine is not None else None
        if key is None or not self._in_call:
            return
        at_key = at_own_key(update.state, key)
        if at_key and self._own_watch.observe(at_key, resolved=update.resolved):
            self._spawn(self._verify_own_state(key), "own-state-check")

    async def _verify_own_state(self, key: str) -> None:
        path = (
            f"/_matrix/client/v3/rooms/{quote(self.room_id, safe='')}/state/"
            f"{quote(EventType.CALL_MEMBER, safe='')}/{quote(key, safe='')}"
        )
        started = self._clock_ms()
        for after in CHECK_AFTER_MS:
            await asyncio.sleep(max(0.0, (started + after - self._clock_ms()) / 1000))
            if not self._in_call:
                return
            try:
                resolved = await self.hs.request("GET", path, query={"format": "event"})
            except (HomeserverError, HomeserverUnreachable, HomeserverTimeout, RateLimited):
                continue  # no state there, or no answer now: the next look, or the next beat
            if resolved_differs(resolved, self._session.state_event(key)):
                self._log.warning(
                    "agent.own_state_reset",
                    event_id=resolved.get("event_id"),
                    detail="the room's current state at our key is not what sync showed",
                )
                self._session.receive_room_update(state=(resolved,), now_ms=self._clock_ms())
                self._recompute()

    def _slot_closed(self) -> None:
        """Our slot was closed mid-call: the call is over. js-sdk 43 hides every sticky
        membership of a closed slot (ours too, so a js-sdk member would only re-join into
        nothing); we leave, in either dialect, as we refuse to join a closed slot."""
        if not self._in_call:
            return
        slot = self._session.slot_id
        self._left_reason = f"the call slot {slot} was closed ({EventType.RTC_SLOT})"
        self._log.info("agent.slot_closed", slot_id=slot, action="leave")
        self._start_leave()
        self._stop_ringing()
        # Tell subscribers now (in_call is already False): with the slot closed, the session
        # may show no further change for them to notice the leave by.
        self._emit(ParticipantsChanged(self._participants, ring=self._ring.state))

    def _resend_for_new_devices(self) -> None:
        """Sticky form in an encrypted room: our membership is a Megolm-encrypted room event,
        unreadable to a device that appeared after we sent it (and before js-sdk's hourly
        re-send). Send it again, once per such device, when an update shows one; the
        homeserver adapter shares a new session with it first."""
        machine = self._machine
        if machine is None or not self._in_call or self.config.dialect is not Dialect.STICKY:
            return
        event_id = machine.membership_event_id
        if event_id is None:
            return
        missing = self.hs.devices_without_room_key(self.room_id, event_id) - self._resent_for
        if not missing:
            return
        self._resent_for |= missing
        self._log.info(
            "agent.membership_resent",
            reason="devices without the room key of our membership",
            devices=sorted(f"{d.user_id}:{d.device_id}" for d in missing),
        )
        machine.resend(self._clock_ms())
        self._poke.set()

    def _feed_legacy(self, events: Iterable[Mapping[str, Any]]) -> None:
        self._legacy.receive_state(events, self._session.joined_members)

    def _recompute(self) -> None:
        now = self._clock_ms()
        changes = self._session.update(now)
        legacy_changed = self._legacy.refresh_devices(now)
        self._check_own()
        if changes is not None or legacy_changed:
            self._publish(self._session.memberships, changes)
        self._legacy_after_change()
        self._wake.set()

    def _publish(
        self, memberships: tuple[CallMembership, ...], changes: MembershipChanges | None
    ) -> None:
        me = (self.hs.user_id, self.hs.device_id)
        parts = participants_of(memberships, self._legacy.devices, self._legacy.conf_id, me)
        diff = participant_changes(self._participants, parts)
        self._participants = parts
        if changes is not None:
            self._ring_after_change(changes)
        if diff.changed:
            self._emit(ParticipantsChanged(parts, diff.joined, diff.left, self._ring.state))

    def _emit(self, event: ParticipantsChanged) -> None:
        self._changes.publish(event)

    def _own_membership(self) -> CallMembership | None:
        m = self._session.own_membership(self.hs.user_id, self.hs.device_id)
        machine = self._machine
        if m is None or machine is None:
            return None
        return m if machine.owns(m) else None

    def _own_expired_locally(self, now_ms: int) -> CallMembership | None:
        """State form: our membership is what the room holds at our key, and only its
        expiry, judged on our clock, keeps it out of the session's list."""
        machine = self._machine
        if machine is None or machine.state_key is None:
            return None
        held = self._session.held_state_membership(machine.state_key)
        on_server_clock = now_ms - self._session.clock_offset_ms
        return held if machine.expired_only(held, on_server_clock) else None

    def _check_own(self) -> None:
        machine = self._machine
        if machine is None and self._legacy.write is not None and self._in_call:
            if self._legacy.present(self._clock_ms()):
                if not self._own_present.is_set():
                    self._log.info("agent.joined", dialect=Dialect.MSC3401_2022.value)
                self._own_present.set()
            else:
                self._own_present.clear()
            return
        if machine is None or not self._in_call:
            return
        own = self._own_membership()
        now = self._clock_ms()
        if own is not None:
            if not self._own_present.is_set():
                self._log.info("agent.joined", created_ts=own.created_ts)
            self._own_present.set()
            machine.observe(
                mm.OwnMembershipSeen(created_ts=own.created_ts, event_id=own.event_id), now
            )
        elif (expired := self._own_expired_locally(now)) is not None:
            # Still the room's state and alive for members whose clocks agree with the
            # homeserver's; only ours says it expired: refresh it, do not re-join.
            machine.observe(
                mm.OwnMembershipExpiredLocally(
                    created_ts=expired.created_ts, event_id=expired.event_id
                ),
                now,
            )
        else:
            if self._own_present.is_set():
                self._log.warning("agent.membership_missing")
            self._own_present.clear()
            acked = self._join_acked_sync_request
            after_join = acked is not None and self._update_sync_request > acked
            machine.observe(mm.OwnMembershipMissing(after_join=after_join), now)
        self._poke.set()

    # -- own entry in the room's 2022 call -------------------------------------------------

    def _legacy_after_change(self) -> None:
        """Keep our 2022 entry (:meth:`OwnLegacyEntry.after_change`)."""
        if not self._in_call:
            return
        writes_current = self._machine is not None
        self._queue_legacy(
            self._legacy.after_change(
                self._clock_ms(),
                writes_current=writes_current,
                own=self._own_membership() if writes_current else None,
                others=self._others_dialects(),
            )
        )

    def _others_dialects(self) -> list[str]:
        return [p.dialect.value for p in self._participants if not p.is_self]

    def _queue_legacy(self, actions: list[PutState]) -> None:
        if actions:
            self._legacy_puts.extend(actions)
            self._legacy_poke.set()

    async def _flush_legacy(self) -> None:
        async with self._legacy_lock:
            while self._legacy_puts:
                a = self._legacy_puts.pop(0)
                try:
                    await self.hs.put_state(self.room_id, a.event_type, a.state_key, a.content)
                except MatrixRTCError as e:
                    # A lost entry is put back on the next observation or renewal. Creating
                    # the call needs the power level for org.matrix.msc3401.call (50 unless
                    # the room lowers it): then nobody else sees our entry's call.
                    self._log.warning("agent.legacy_put_failed", type=a.event_type, error=str(e))

    async def _legacy_loop(self) -> None:
        """Perform our 2022 entry's puts; renew it (expires_ts) when due."""
        while True:
            due = self._legacy.next_renewal_ms()
            timeout = None if due is None else max(0.0, (due - self._clock_ms()) / 1000)
            await _wait_event(self._legacy_poke, timeout)
            self._legacy_poke.clear()
            if self._in_call:
                self._queue_legacy(self._legacy.tick(self._clock_ms()))
            await self._flush_legacy()

    # -- own membership: perform the machine's requests ------------------------------------

    def _new_machine(self) -> mm.OwnMembershipMachine:
        cfg = self.config
        create = self.hs.room_state(self.room_id).get((EventType.ROOM_CREATE, ""))
        content = create.get("content") if create is not None else None
        version = content.get("room_version") if isinstance(content, dict) else None
        return mm.OwnMembershipMachine(
            user_id=self.hs.user_id,
            device_id=self.hs.device_id,
            dialect=cfg.dialect,
            room_version=version if isinstance(version, str) else "1",
            member_id=str(uuid.uuid4()) if cfg.dialect is Dialect.STICKY else None,
            room_id=self.room_id,
            config=mm.MembershipConfig.for_timings(
                delay_ms=cfg.delayed_leave_ms,
                restart_interval_ms=cfg.restart_interval_ms,
                restart_timeout_ms=cfg.restart_timeout_ms,
                expires_ms=cfg.expires_ms,
                sticky_duration_ms=cfg.sticky_duration_ms,
                network_retry_ms=cfg.network_retry_ms,
                network_retries=cfg.network_retries,
                late_join_sweep_ms=cfg.late_join_sweep_ms,
            ),
        )

    async def _drive(self) -> None:
        """Perform the machine's requests until it stops while we are not in the call.

        When it gives up while we are still in the call (the homeserver was away longer than
        the retry budget), wait with backoff until the homeserver answers, then join again:
        a new membership from the first step (the old delayed leave is cancelled first).
        """
        machine = self.machine
        try:
            while True:
                action = machine.next_action(self._clock_ms())
                for ev in machine.drain_events():
                    self._log.info("agent.membership", change=repr(ev))
                    if isinstance(ev, mm.StatusChanged) and ev.new is mm.MembershipStatus.CONNECTED:
                        self._rejoin_delay_ms = self.config.rejoin_backoff_ms
                if isinstance(action, mm.Stopped):
                    outcome = mm.stop_outcome(action, in_call=self._in_call)
                    if outcome is mm.StopOutcome.REJOIN:
                        # Recovered from by re-joining: error is kept for giving up (chaos).
                        self._log.warning(
                            "agent.membership_failed", error=action.error, will_rejoin=True
                        )
                        await self._recover(machine, action.error or "")
                        continue
                    if outcome is mm.StopOutcome.GAVE_UP:
                        self._log.error(
                            "agent.membership_failed", error=action.error, will_rejoin=False
                        )
                    if machine.running:  # leave() during the recovery wait: take it back
                        continue
                    return
                if isinstance(action, mm.Wait):
                    self._poke.clear()
                    delay = max(0.0, (action.until_ms - self._clock_ms()) / 1000)
                    await _wait_event(self._poke, delay)
                    continue
                result = await self._perform_unless_leaving(machine, action)
                if result is None:
                    continue  # abandoned for the leave, which goes out now
                if isinstance(action, mm.SendJoin) and isinstance(result, mm.Ok):
                    # A sync asked for after this point shows the room after our join.
                    self._join_acked_sync_request = self.hs.sync_requests_started
                machine.receive_result(result, self._clock_ms())
        finally:
            self._stopped.set()

    async def _recover(self, machine: mm.OwnMembershipMachine, error: str) -> None:
        """Wait with backoff until the homeserver answers, then join again (unless leave()
        was called meanwhile)."""
        while self._in_call:
            delay_ms = self._rejoin_delay_ms
            self._rejoin_delay_ms = min(delay_ms * 2, self.config.rejoin_max_backoff_ms)
            self._log.warning("agent.rejoin_scheduled", after_ms=delay_ms, error=error)
            if await _wait_event(self._leaving, delay_ms / 1000) or not self._in_call:
                return
            try:
                await self.hs.request(
                    "GET",
                    "/_matrix/client/versions",
                    auth=False,
                    timeout_s=self.config.restart_timeout_ms / 1000,
                )
            except MatrixRTCError as e:
                error = str(e)
                continue
            self._recoveries += 1
            self._log.warning("agent.rejoining", recoveries=self._recoveries)
            machine.join(
                self._clock_ms(),
                transports=self.config.transports,
                intent=self.config.intent,
                multi_sfu=self.config.multi_sfu,
            )
            self._check_own()
            return

    async def _perform_unless_leaving(
        self, machine: mm.OwnMembershipMachine, action: mm.Request
    ) -> mm.Result | None:
        """Perform ``action``; if :meth:`leave` comes first, cancel it and tell the machine it
        was abandoned (None), so the leave goes out now. On a hung homeserver the request
        would otherwise hold the leave back until its timeout (20 s): longer than
        :meth:`leave` waits, so the leave was never sent (chaos)."""
        if self._leaving.is_set():
            return await self._perform(action)  # a request of the leave itself
        first, done = await first_of(request=self._perform(action), leaving=self._leaving.wait())
        if first == "request":
            result: mm.Result = done.result()
            return result
        if machine.abandon(self._clock_ms()):
            self._log.warning("agent.request_abandoned", request=type(action).__name__)
            return None
        return mm.LocalTimeout()  # still the machine's plan: as if it had timed out

    async def _perform(self, action: mm.Request) -> mm.Result:
        hs, room = self.hs, self.room_id
        try:
            match action:
                case mm.ScheduleDelayedLeave(state_key=key) if key is not None:
                    delay_id = await hs.schedule_delayed_state(
                        room, action.event_type, key, action.content, action.delay_ms
                    )
                    return mm.Ok(delay_id=delay_id)
                case mm.ScheduleDelayedLeave():
                    delay_id = await hs.schedule_delayed_sticky(
                        room,
                        action.event_type,
                        action.content,
                        action.delay_ms,
                        action.sticky_duration_ms or msc4354.MAX_STICKY_DURATION_MS,
                    )
                    return mm.Ok(delay_id=delay_id)
                case mm.CancelDelayedLeave():
                    await hs.update_delayed(action.delay_id, DelayAction.CANCEL)
                case mm.RestartDelayedLeave():
                    await hs.update_delayed(
                        action.delay_id, DelayAction.RESTART, timeout_s=action.timeout_ms / 1000
                    )
                    self.heartbeats += 1
                case mm.SendDelayedLeaveNow():
                    await hs.update_delayed(action.delay_id, DelayAction.SEND)
                case mm.SendJoin() | mm.SendLeave():
                    if action.state_key is not None:
                        event_id = await hs.put_state(
                            room, action.event_type, action.state_key, action.content
                        )
                    else:
                        event_id = await hs.send_sticky(
                            room,
                            action.event_type,
                            action.content,
                            action.sticky_duration_ms or msc4354.MAX_STICKY_DURATION_MS,
                        )
                    if isinstance(action, mm.SendJoin):
                        if not action.refresh:
                            self._joins_sent += 1
                        self._log.info("agent.join_sent", refresh=action.refresh)
                        return mm.Ok(event_id=event_id)
                    self._log.info("agent.left", via="leave event")
        except DelayNotFound:
            return mm.NotFound()
        except RateLimited as e:
            return mm.RetryAfter(e.retry_after_ms)
        except HomeserverTimeout:
            return mm.LocalTimeout()
        except HomeserverUnreachable as e:
            return mm.NetworkError(str(e))
        except DelayTooLong as e:
            return mm.MaxDelayExceeded(e.max_delay_ms)
        except Unsupported:
            return mm.DelayedEventsUnsupported()
        except HomeserverError as e:
            if e.errcode == "M_NOT_FOUND":
                return mm.NotFound()
            if e.transient:
                return mm.NetworkError(str(e))
            return mm.Rejected(e.errcode, e.error)
        except MatrixRTCError as e:  # other remote failures, and local crypto errors
            return mm.Rejected("", str(e))
        if isinstance(action, mm.SendDelayedLeaveNow):
            self._log.info("agent.left", via="delayed leave sent now")
        return mm.Ok()

    @property
    def rejoins(self) -> int:
        """Joins sent after the first (not counting expiry refreshes)."""
        return max(0, self._joins_sent - 1)

    # -- timers -----------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        """Recompute at the soonest membership expiry and at the ring's end of lifetime."""
        fired_ms = 0  # deadlines at or before this have been handled: never spin on them
        while True:
            self._wake.clear()
            candidates = (
                self._session.next_wakeup_ms(),
                self._ring.deadline_ms,
                self._legacy.next_expiry_ms(self._clock_ms()),
            )
            deadlines = [t for t in candidates if t is not None and t > fired_ms]
            timeout = None
            if deadlines:
                timeout = max(0.0, (min(deadlines) - self._clock_ms()) / 1000) + 0.01
            if await _wait_event(self._wake, timeout):
                continue
            fired_ms = self._clock_ms()
            ended = self._ring.on_time(fired_ms)
            if ended is not None:
                self._ring_ended_as(ended)
            self._recompute()

    # -- ring -------------------------------------------------------------------------------

    def _ring_after_change(self, changes: MembershipChanges) -> None:
        if self._ring.state is RingState.RINGING:
            if self._ring.on_memberships(changes.memberships) is not None:
                self._ring_ended_as(RingState.ANSWERED, emit=False)
            return
        own = self._own_membership()
        if self._ring.should_ring(
            enabled=self.config.ring,
            memberships=changes.memberships,
            own=own,
            session_started=changes.session_started,
        ):
            assert own is not None
            self._spawn(self._send_ring(own), "ring")

    async def _send_ring(self, own: CallMembership) -> None:
        # js-sdk 43 receivers refuse a notification unless its slot exists and is open.
        await self.ensure_slot_open()
        rung = sorted(self._session.joined_members - {self.hs.user_id})
        note = RtcNotification.ring(
            membership_event_id=own.event_id,
            sender_ts=self._clock_ms(),
            intent=self.config.intent,
            lifetime=self.config.ring_lifetime_ms,
            slot_id=self._session.slot_id,
            # js-sdk mentions only the room; its receivers then refuse the ring unless the
            # sender may notify the room (power level, 50 by default). Naming the rung users
            # too makes the ring valid for them whatever our power level.
            mention_user_ids=rung[:_MAX_MENTIONS],
        )
        # Sticky (keyed by the slot) where the homeserver has MSC4354, as js-sdk sends it.
        if await self.hs.supports(msc4354.UNSTABLE_FEATURE):
            event_id = await self.hs.send_sticky(
                self.room_id, EventType.RTC_NOTIFICATION, note.to_json(), note.sticky_duration_ms
            )
        else:
            event_id = await self.hs.send_event(
                self.room_id, EventType.RTC_NOTIFICATION, note.to_json()
            )
        self._ring.started(event_id, note, self._clock_ms(), self._session.joined_members)
        self._log.info(
            "agent.ringing", lifetime_ms=note.effective_lifetime_ms, rung=len(self._ring.rung)
        )
        self._emit(ParticipantsChanged(self._participants, ring=self._ring.state))
        self._wake.set()

    def _on_decline(self, ev: Mapping[str, Any]) -> None:
        ended = self._ring.on_decline(ev.get("sender"), ev.get("content"))
        if ended is not None:
            self._ring_ended_as(ended)

    def _on_notification(self, ev: Mapping[str, Any]) -> None:
        """A ring for us? Judged by js-sdk 43's receiving rules."""
        event_id = ev.get("event_id")
        if not isinstance(event_id, str):
            return
        verdict = judge_notification(
            ev,
            receiver=self.hs.user_id,
            now_ms=self._clock_ms(),
            slot_status=self._session.slot_status,
            # Room mentions: Synapse's default notifications.room power level is 50; the
            # caller usually created the room. Without power levels at hand, trust the
            # homeserver, which delivered it (differs from js-sdk: see README).
            sender_may_notify_room=True,
            current_sticky_event_id=event_id,
            receiver_in_slot=self._own_membership() is not None,
        )
        if verdict.notification is None:
            self._log.info("agent.notification_ignored", event_id=event_id, reason=verdict.reason)
            return
        self.incoming_rings[event_id] = verdict.notification
        self._log.info("agent.ring_received", event_id=event_id, sender=ev.get("sender"))

    async def decline(self, notification_event_id: str) -> str:
        """Decline a ring (MSC4310): sticky where the homeserver has MSC4354, as js-sdk 43."""
        content = RtcDecline.for_notification(notification_event_id).to_json()
        self.incoming_rings.pop(notification_event_id, None)
        if await self.hs.supports(msc4354.UNSTABLE_FEATURE):
            return await self.hs.send_sticky(
                self.room_id, EventType.RTC_DECLINE, content, DECLINE_STICKY_MS
            )
        return await self.hs.send_event(self.room_id, EventType.RTC_DECLINE, content)

    async def _respect_slot(self) -> None:
        """No membership goes into a closed slot; the sticky dialect opens an absent one."""
        status = self._session.slot_status
        if status is SlotStatus.CLOSED:
            slot = self._session.slot_id
            raise LocalError(
                f"the call slot {slot} of room {self.room_id} is closed "
                f"({EventType.RTC_SLOT} status {self._slot_status_text()}): not joining. "
                "Element Call / matrix-js-sdk ignore sticky memberships in a closed slot; "
                "someone with the power level must open it again"
            )
        if self.config.dialect is Dialect.STICKY and status is not SlotStatus.OPEN:
            await self.ensure_slot_open()

    def _slot_status_text(self) -> str:
        content = self._session.slot_content or {}
        return repr(content.get("status"))

    async def ensure_slot_open(self) -> bool:
        """js-sdk 43 ``ensureRtcSlotOpen``: open our slot (``m.call#ROOM``), keeping any other
        content, declaring per-member encryption in encrypted rooms. Returns whether it is
        open; a homeserver refusal (power levels) is logged, not raised."""
        encryption = SLOT_ENCRYPTION_PER_MEMBER if self.hs.is_encrypted(self.room_id) else None
        application = self._session.slot_id.split("#", 1)[0]
        content = open_slot_content(self._session.slot_content, application, encryption)
        if content is None:
            return True
        try:
            await self.hs.put_state(
                self.room_id, EventType.RTC_SLOT, self._session.slot_id, content
            )
        except HomeserverError as e:
            self._log.warning("agent.slot_open_failed", slot_id=self._session.slot_id, error=str(e))
            return False
        self._log.info("agent.slot_opened", slot_id=self._session.slot_id)
        return True

    def _stop_ringing(self) -> None:
        ended = self._ring.cancel()
        if ended is not None:
            self._ring_ended_as(ended)

    def _ring_ended_as(self, state: RingState, *, emit: bool = True) -> None:
        self._ring_ended.set()
        if emit:
            self._emit(ParticipantsChanged(self._participants, ring=state))
        unanswered = state in (RingState.DECLINED, RingState.EXPIRED)
        if unanswered and self.config.leave_when_ring_unanswered and self._in_call:
            self._log.info("agent.leaving_unanswered_call", ring=state.value)
            self._spawn(self.leave(), "ring-leave")
