"""Own-membership state machine (sans-I/O): delayed leave, heartbeat, expiry refresh, leave.

Theory of operation
-------------------
This is js-sdk's ``MembershipManager`` + ``ActionScheduler`` (spec/matrixrtc.md §2.3) with the
I/O taken out. The machine keeps a queue of *steps* with due times and performs at most one
request at a time. The adapter drives it with a loop::

    m = OwnMembershipMachine(user_id=…, device_id=…, dialect=Dialect.STATE, room_version=…)
    m.join(now_ms, transports=[LivekitTransport(...)], intent="video")
    m.update_membership(now_ms, transports=[...])      # e.g. start advertising mesh, live
    while True:
        action = m.next_action(clock())
        match action:
            case Stopped():  break                         # left, or failed (action.error)
            case Wait(until_ms=t):  sleep until t, or until an observation/leave arrives
            case _:                                        # a request: perform it, then
                m.receive_result(<Ok/NotFound/RetryAfter/…>, clock())
        # whenever the RTC session changes:
        m.observe(OwnMembershipSeen(created_ts=…, event_id=…) | OwnMembershipMissing(), clock())
        for ev in m.drain_events(): ...                    # StatusChanged, ProbablyLeftChanged

Requests and what the adapter does (state form shown; sticky form sends a sticky room event
``org.matrix.msc4143.rtc.member`` with ``sticky_duration_ms`` instead of a state event):

* ``ScheduleDelayedLeave``  PUT state ``content`` at ``state_key`` with ``delay_ms``  → Ok(delay_id)
* ``CancelDelayedLeave``    POST …/delayed_events/{delay_id}/cancel                  → Ok()
* ``RestartDelayedLeave``   POST …/{delay_id}/restart, abort after ``timeout_ms``    → Ok()
* ``SendDelayedLeaveNow``   POST …/{delay_id}/send                                   → Ok()
* ``SendJoin``              PUT state ``content`` at ``state_key``                    → Ok(event_id)
* ``SendLeave``             PUT state ``content`` (``{}``) at ``state_key``           → Ok()

Results: ``Ok``, ``NotFound`` (M_NOT_FOUND), ``RetryAfter(retry_after_ms)`` (429 /
M_LIMIT_EXCEEDED), ``NetworkError`` (connection error, 5xx), ``LocalTimeout`` (our abort),
``MaxDelayExceeded(max_delay_ms)``, ``DelayedEventsUnsupported`` (no ``org.matrix.msc4140`` in
/versions), ``Rejected(errcode)`` (anything else). Results are values, not the adapter's
exceptions: the agent maps ``matrixrtc.matrix.RateLimited`` to ``RetryAfter`` and
``matrixrtc.matrix.Unsupported`` to ``DelayedEventsUnsupported``.

Step graph (js-sdk's, same names in snake case)::

    join ─► SEND_DELAYED_LEAVE ─ok─► SEND_JOIN ─ok─► RESTART (now, then every 5 s) ◄─┐
               ▲    │ (cancel an old delay id first)  └─ok─► UPDATE_EXPIRY (hourly) ─┘
               │    └─unsupported/failed on first join─► SEND_JOIN (no delayed leave)
               └── RESTART got M_NOT_FOUND, or our membership went missing (re-join)
    leave ─► SEND_DELAYED_LEAVE_NOW ─not found/failed─► SEND_LEAVE ─► stopped

Rules: rate limits wait ``retry_after_ms`` (else 5 s), network errors wait 3 s, local timeouts
retry at once; each step has its own budget (10 + 10) and exhausting one stops the machine
with ``error`` set. Local timeouts count towards no budget (js-sdk 43): a slow homeserver
never makes the machine give up and re-join. The restart request is aborted after
``min(2000, expected_leave_ts − now)`` so that reaching the server's leave time is noticed
(``probably_left``). A successful join restarts the delayed leave at once (old Synapse
cancels delayed state on overwrite) and plans refreshes at ``start + k·min(expiry, 1 h) − 5 s``
with ``expires = expiry·(k+1)`` and the original ``created_ts``. A ``join``/``leave``/re-join
replaces the queue; a result that arrives for a request started before that still updates
the facts (delay id, "our membership exists") but not the queue, as js-sdk's scheduler
wake-up does.

Where this differs from js-sdk (deliberately; each has a test):
* ``MaxDelayExceeded`` without a limit below our delay is a failure of the delayed leave, not
  an endless retry of the same request.
* A delayed leave that fails on the first join disables delayed events for this join; js-sdk
  joins too but then retries from the heartbeat path and stops with a fatal error.
* ``DelayedEventsUnsupported`` when leaving via the delayed event falls back to sending the
  leave; js-sdk returns and leaves the membership in the room.
* "Own membership missing" right after our join is believed only once the join was seen in
  sync, the sync that showed it was requested after the join was acknowledged, or
  ``own_membership_grace_ms`` has passed (js-sdk re-joins on this race).
* ``leave`` after a failure still takes our membership back.
* A restart due after the expected leave time is sent with the plain local timeout and sets
  ``probably_left`` at once, instead of a zero-length abort that does the same thing later.
* A join that keeps an old ``created_ts`` (a re-send with new transports or intent, a join
  again after giving up while the room still holds ours) carries as many expiry periods as
  the call has lived, so it is not already expired when sent; js-sdk sends one period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, TypeAlias

import structlog

from matrixrtc.errors import ConfigError, LocalError
from matrixrtc.model._json import JsonDict
from matrixrtc.model.event_types import EventType
from matrixrtc.model.membership import (
    DEFAULT_EXPIRES_MS,
    DEFAULT_SLOT_ID,
    CallMembership,
    Dialect,
    RtcMemberData,
    SessionMembershipData,
    state_key_for,
    state_leave_content,
    sticky_leave_content,
)
from matrixrtc.model.msc4354 import MAX_STICKY_DURATION_MS
from matrixrtc.model.transports import Transport

__all__ = [
    "CancelDelayedLeave",
    "DelayedEventsUnsupported",
    "LocalTimeout",
    "MachineEvent",
    "MaxDelayExceeded",
    "MembershipAction",
    "MembershipConfig",
    "MembershipStatus",
    "NetworkError",
    "NotFound",
    "Observation",
    "Ok",
    "OwnMembershipMachine",
    "OwnMembershipMissing",
    "OwnMembershipSeen",
    "ProbablyLeftChanged",
    "Rejected",
    "Request",
    "RestartDelayedLeave",
    "Result",
    "RetryAfter",
    "ScheduleDelayedLeave",
    "SendDelayedLeaveNow",
    "SendJoin",
    "SendLeave",
    "StatusChanged",
    "Step",
    "StopOutcome",
    "Stopped",
    "Wait",
    "stop_outcome",
]

_log = structlog.get_logger(__name__)

# MSC4354 stickiness lasts at most an hour, so js-sdk refreshes at least hourly in both forms.
STICKY_DURATION_MS: Final = 3_600_000


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipConfig:
    """Timings and budgets; defaults are js-sdk's (Element Call uses 10 s delay, 1 s retry)."""

    delayed_leave_delay_ms: int = 8_000
    delayed_leave_restart_ms: int = 5_000
    restart_local_timeout_ms: int = 2_000
    expiry_ms: int = DEFAULT_EXPIRES_MS
    expiry_headroom_ms: int = 5_000
    sticky_duration_ms: int = STICKY_DURATION_MS
    network_error_retry_ms: int = 3_000
    rate_limit_default_ms: int = 5_000
    max_network_retries: int = 10
    max_rate_limit_retries: int = 10
    # After our join is sent, "own membership missing" is believed only once we have seen the
    # join in sync or after this long (sync lags the PUT response; js-sdk has this race).
    own_membership_grace_ms: int = 10_000
    # A join abandoned for a leave (its PUT cancelled on a hung homeserver) may still land
    # after the leave: a ghost membership with no delayed leave left to remove it. Once the
    # leave is out, a delayed leave this long is scheduled too, to overwrite such a late join;
    # longer than the client's request timeout (20 s), within which the PUT can still land.
    late_join_sweep_ms: int = 30_000

    def __post_init__(self) -> None:
        for name in (
            "delayed_leave_delay_ms",
            "delayed_leave_restart_ms",
            "restart_local_timeout_ms",
            "expiry_ms",
            "sticky_duration_ms",
            "late_join_sweep_ms",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"MembershipConfig.{name} must be positive")
        for name in (
            "expiry_headroom_ms",
            "network_error_retry_ms",
            "rate_limit_default_ms",
            "max_network_retries",
            "max_rate_limit_retries",
            "own_membership_grace_ms",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"MembershipConfig.{name} must not be negative")
        if self.expiry_headroom_ms >= min(self.expiry_ms, self.sticky_duration_ms):
            raise ConfigError(
                "MembershipConfig.expiry_headroom_ms must be below the refresh period"
            )

    @classmethod
    def for_timings(
        cls,
        *,
        delay_ms: int,
        restart_interval_ms: int,
        restart_timeout_ms: int,
        expires_ms: int,
        sticky_duration_ms: int,
        network_retry_ms: int,
        network_retries: int,
        late_join_sweep_ms: int = 30_000,
    ) -> MembershipConfig:
        """The machine's timings from a caller's (the agent's) settings. A restart period at
        or above the delay would let the leave fire between restarts, so the period is capped
        at 5/8 of the delay (js-sdk's 5 s for 8 s); stickiness at MSC4354's hour."""
        return cls(
            delayed_leave_delay_ms=delay_ms,
            delayed_leave_restart_ms=min(restart_interval_ms, delay_ms * 5 // 8),
            restart_local_timeout_ms=restart_timeout_ms,
            expiry_ms=expires_ms,
            sticky_duration_ms=min(sticky_duration_ms, MAX_STICKY_DURATION_MS),
            network_error_retry_ms=network_retry_ms,
            max_network_retries=network_retries,
            late_join_sweep_ms=late_join_sweep_ms,
        )


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleDelayedLeave:
    """Schedule ``content`` to be sent after ``delay_ms`` (MSC4140); answer Ok(delay_id)."""

    event_type: str
    state_key: str | None  # None: sticky room event (send with sticky_duration_ms)
    content: JsonDict
    delay_ms: int
    sticky_duration_ms: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelDelayedLeave:
    delay_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartDelayedLeave:
    """Restart the delayed leave; abort locally after ``timeout_ms`` and answer LocalTimeout."""

    delay_id: str
    timeout_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendDelayedLeaveNow:
    delay_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SendJoin:
    """Send our membership; answer Ok(event_id). ``refresh`` marks an expiry update."""

    event_type: str
    state_key: str | None
    content: JsonDict
    sticky_duration_ms: int | None
    refresh: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SendLeave:
    event_type: str
    state_key: str | None
    content: JsonDict
    sticky_duration_ms: int | None


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing is due before ``until_ms``; call ``next_action`` then (or on new input)."""

    until_ms: int


@dataclass(frozen=True, slots=True)
class Stopped:
    """The machine is not running: left cleanly (``error`` None) or gave up (``error``)."""

    error: str | None = None


class StopOutcome(StrEnum):
    """What follows a :class:`Stopped`: the caller's decision, kept here so its log level
    follows from the same rule as what it does."""

    LEFT = "left"  # stopped cleanly
    REJOIN = "rejoin"  # gave up while the caller is still in the call: it joins again (warning)
    GAVE_UP = "gave_up"  # gave up with nothing to take it back: final (error)


def stop_outcome(stopped: Stopped, *, in_call: bool) -> StopOutcome:
    """A machine that gives up while its caller still wants the call is joined again after a
    backoff (a partition longer than the retry budget), so that failure is recovered from;
    one that gives up once the caller left (the leave itself failed) is not."""
    if stopped.error is None:
        return StopOutcome.LEFT
    return StopOutcome.REJOIN if in_call else StopOutcome.GAVE_UP


Request: TypeAlias = (
    ScheduleDelayedLeave
    | CancelDelayedLeave
    | RestartDelayedLeave
    | SendDelayedLeaveNow
    | SendJoin
    | SendLeave
)
MembershipAction: TypeAlias = Request | Wait | Stopped


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True, kw_only=True)
class Ok:
    delay_id: str | None = None  # ScheduleDelayedLeave
    event_id: str | None = None  # SendJoin


@dataclass(frozen=True, slots=True)
class NotFound:
    """M_NOT_FOUND (unknown delay id)."""


@dataclass(frozen=True, slots=True)
class RetryAfter:
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class NetworkError:
    """Connection failure or a 5xx answer."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class LocalTimeout:
    """We aborted the request ourselves (``RestartDelayedLeave.timeout_ms`` elapsed)."""


@dataclass(frozen=True, slots=True)
class MaxDelayExceeded:
    """The homeserver refuses ``delay_ms``; ``max_delay_ms`` is its limit when it says so."""

    max_delay_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DelayedEventsUnsupported:
    """The homeserver does not do delayed events (MSC4140)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """Any other error answer."""

    errcode: str = ""
    reason: str = ""


Result: TypeAlias = (
    Ok
    | NotFound
    | RetryAfter
    | NetworkError
    | LocalTimeout
    | MaxDelayExceeded
    | DelayedEventsUnsupported
) | Rejected


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnMembershipSeen:
    """The session lists our membership; ``created_ts`` is carried into later sends."""

    created_ts: int
    event_id: str = ""


@dataclass(frozen=True, slots=True)
class OwnMembershipMissing:
    """The session does not list our membership (left by the server, overwritten, expired).

    ``after_join``: the sync response that showed it was requested after our latest join was
    acknowledged, so it cannot predate that join (e.g. an old delayed leave the homeserver
    fired after our re-join). Believed at once; otherwise only after the grace period.
    """

    after_join: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnMembershipExpiredLocally:
    """The room's state at our key is still our membership, but our own clock judges it
    expired (state form: ``created_ts + expires <= now``). ``created_ts`` is the homeserver's
    clock; when ours runs ahead of it by more than the refresh headroom, our view expires
    before the refresh that keeps it alive for everyone else. Not a reason to re-join (a new
    membership to others, new keys): the machine refreshes the expiry at once."""

    created_ts: int
    event_id: str = ""


Observation: TypeAlias = OwnMembershipSeen | OwnMembershipMissing | OwnMembershipExpiredLocally


class MembershipStatus(StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the server has probably sent our leave; getting back in
    DISCONNECTING = "disconnecting"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StatusChanged:
    old: MembershipStatus
    new: MembershipStatus


@dataclass(frozen=True, slots=True)
class ProbablyLeftChanged:
    probably_left: bool


MachineEvent: TypeAlias = StatusChanged | ProbablyLeftChanged


# ----------------------------------------------------------------------------- machine


class Step(StrEnum):
    """Scheduled step types (js-sdk ``MembershipActionType``)."""

    SEND_DELAYED_LEAVE = "send_delayed_leave"
    SEND_JOIN = "send_join"
    RESTART_DELAYED_LEAVE = "restart_delayed_leave"
    UPDATE_EXPIRY = "update_expiry"
    SEND_DELAYED_LEAVE_NOW = "send_delayed_leave_now"
    SEND_LEAVE = "send_leave"
    SWEEP_LATE_JOIN = "sweep_late_join"


@dataclass(order=True, frozen=True, slots=True)
class _Scheduled:
    due_ms: int
    seq: int
    step: Step = field(compare=False)


@dataclass(frozen=True, slots=True)
class _InFlight:
    step: Step
    request: Request
    generation: int


class _Fatal(Exception):
    pass


# A queue update: ("insert", steps) appends, ("replace", steps) replaces the whole queue.
_Update: TypeAlias = tuple[str, list[tuple[int, Step]]] | None


class OwnMembershipMachine:
    """Our own membership in one room's call slot; see the module docstring."""

    def __init__(
        self,
        *,
        user_id: str,
        device_id: str,
        dialect: Dialect = Dialect.STATE,
        room_version: str | None = None,
        member_id: str | None = None,
        config: MembershipConfig | None = None,
        room_id: str | None = None,
    ) -> None:
        if dialect is Dialect.STICKY and not member_id:
            raise LocalError("the sticky dialect needs a member_id (a fresh UUID per join)")
        self.user_id = user_id
        self.device_id = device_id
        self.dialect = dialect
        self.config = config or MembershipConfig()
        self.state_key: str | None = (
            state_key_for(user_id, device_id, room_version) if dialect is Dialect.STATE else None
        )
        self.member_id = member_id or f"{user_id}:{device_id}"
        # State form: LiveKit transports get the room id as `livekit_alias` (Element Call).
        self.room_id = room_id
        self._log = _log.bind(user_id=user_id, device_id=device_id, dialect=dialect.value)
        # Join parameters.
        self._transports: tuple[Transport, ...] = ()
        self._intent: str | None = None
        self._multi_sfu = True
        # Scheduler.
        self._running = False
        self._activated = False
        self._queue: list[_Scheduled] = []
        self._seq = 0
        self._generation = 0
        self._in_flight: _InFlight | None = None
        self._error: str | None = None
        # Facts (js-sdk MembershipManagerState).
        self._delay_id: str | None = None
        self._delay_override_ms: int | None = None
        self._delayed_ok = True
        self._has_member_event = False
        self._start_ms = 0
        self._expiry_iterations = 1
        self._join_iterations = 1  # the periods the join on the wire covers (see _periods_lived)
        self._expected_leave_ms: int | None = None
        self._probably_left = False
        self._rate_retries: dict[Step, int] = {}
        self._net_retries: dict[Step, int] = {}
        self._created_ts: int | None = None
        self._last_join_event_id: str | None = None
        self._own_event_id: str | None = None  # our membership event as the session shows it
        self._content_dirty = False  # transports/intent changed since the last join was built
        self._join_sent_ms: int | None = None
        self._seen_since_join = False
        # Our membership was seen missing while the delayed leave was being (re)scheduled:
        # once that is done, re-join (no later sync need say it again).
        self._missing_while_busy = False
        # A join of ours was abandoned (may still land): the leave ends with a sweep.
        self._join_abandoned = False
        # Outbox.
        self._events: list[MachineEvent] = []
        self._status = MembershipStatus.DISCONNECTED

    # ------------------------------------------------------------------ properties

    @property
    def status(self) -> MembershipStatus:
        return self._status

    @property
    def running(self) -> bool:
        return self._running

    @property
    def joined(self) -> bool:
        """We intend to be in the call (join called, leave not yet)."""
        return self._activated

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def delay_id(self) -> str | None:
        return self._delay_id

    @property
    def delay_ms(self) -> int:
        """The delayed-leave delay in use (lowered if the server has a maximum)."""
        return self._delay_override_ms or self.config.delayed_leave_delay_ms

    @property
    def delayed_events_in_use(self) -> bool:
        return self._delayed_ok

    @property
    def expected_leave_ms(self) -> int | None:
        """When the server will send our delayed leave unless restarted again."""
        return self._expected_leave_ms

    @property
    def probably_left(self) -> bool:
        return self._probably_left

    @property
    def has_membership_event(self) -> bool:
        return self._has_member_event

    @property
    def membership_event_id(self) -> str | None:
        """The event id of the last join (or refresh) we sent, once the server answered."""
        return self._last_join_event_id if self._has_member_event else None

    @property
    def created_ts(self) -> int | None:
        return self._created_ts

    @property
    def event_type(self) -> str:
        return EventType.CALL_MEMBER if self.dialect is Dialect.STATE else EventType.RTC_MEMBER

    @property
    def scheduled(self) -> tuple[tuple[int, Step], ...]:
        """The queue (due time, step), earliest first: for logs and tests."""
        return tuple((s.due_ms, s.step) for s in sorted(self._queue))

    @property
    def in_flight(self) -> Request | None:
        return self._in_flight.request if self._in_flight else None

    def owns(self, membership: CallMembership) -> bool:
        """Whether ``membership`` (one the session lists for our user and device) is the one
        this machine writes: same dialect, and our state key (state form) or our member id
        (sticky form; another of our joins has another)."""
        if self.dialect is Dialect.STICKY:
            return membership.dialect is Dialect.STICKY and membership.member_id == self.member_id
        return membership.dialect is Dialect.STATE and membership.state_key == self.state_key

    def expired_only(self, held: CallMembership | None, now_ms: int) -> bool:
        """State form: whether ``held``, what the room holds at our state key, is our own
        membership and only its expiry at ``now_ms`` (the homeserver's clock) keeps it out of
        the session's list (then :class:`OwnMembershipExpiredLocally` is what to observe)."""
        return (
            self.dialect is Dialect.STATE
            and held is not None
            and held.dialect is Dialect.STATE
            and held.sender == self.user_id
            and held.device_id == self.device_id
            and held.is_expired(now_ms)
        )

    def drain_events(self) -> list[MachineEvent]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ inputs

    def join(
        self,
        now_ms: int,
        *,
        transports: tuple[Transport, ...] | list[Transport],
        intent: str | None = None,
        multi_sfu: bool = True,
    ) -> None:
        """Start joining. ``transports[0]`` is where we publish (state form: multi_sfu)."""
        if self._running:
            raise LocalError(f"join while the machine is running (status {self._status.value})")
        self._transports = tuple(transports)
        self._intent = intent
        self._multi_sfu = multi_sfu
        self._running = True
        self._activated = True
        self._error = None
        # A delay id from an earlier run is kept: SEND_DELAYED_LEAVE cancels it first.
        self._delayed_ok = True
        self._has_member_event = False
        self._expiry_iterations = 1
        self._expected_leave_ms = None
        self._rate_retries.clear()
        self._net_retries.clear()
        self._created_ts = None
        self._last_join_event_id = None
        self._own_event_id = None
        self._join_sent_ms = None
        self._seen_since_join = False
        self._missing_while_busy = False
        self._join_abandoned = False
        self._set_probably_left(False)
        self._replace([(now_ms, Step.SEND_DELAYED_LEAVE)])
        self._log.info("join")
        self._update_status()

    def update_membership(
        self,
        now_ms: int,
        *,
        transports: tuple[Transport, ...] | list[Transport] | None = None,
        intent: str | None = None,
    ) -> None:
        """Change the advertised transports and/or intent while joined (js-sdk
        ``updateCallIntent``): the join is re-sent with the same ``created_ts``."""
        if not self._activated:
            raise LocalError("update_membership while not joined")
        changed = False
        if transports is not None and tuple(transports) != self._transports:
            self._transports = tuple(transports)
            changed = True
        if intent is not None and intent != self._intent:
            self._intent = intent
            changed = True
        if not changed:
            return
        self._queue_resend(now_ms)

    def resend(self, now_ms: int) -> None:
        """Send the join again, same content and ``created_ts`` (e.g. because a device that
        appeared after the last send cannot read an encrypted one). No-op while not joined."""
        if self._activated:
            self._queue_resend(now_ms)

    def _queue_resend(self, now_ms: int) -> None:
        self._content_dirty = True
        if not self._has_member_event:
            return  # the pending join will carry the new values
        sending = self._in_flight is not None and self._in_flight.step in (
            Step.SEND_JOIN,
            Step.UPDATE_EXPIRY,
        )
        if sending:
            return  # re-sent when that request succeeds (its content is already stale)
        if not any(s.step is Step.SEND_JOIN for s in self._queue):
            self._insert(now_ms, Step.SEND_JOIN)

    def leave(self, now_ms: int) -> None:
        """Leave: fire the scheduled delayed leave now, else send the leave content.

        Also works after a failure: if our membership may still be in the room, the machine
        runs again just to take it back (then stops with the old error cleared).
        """
        if self._running and not self._activated:
            return  # already leaving
        if not self._running and not self._has_member_event:
            return  # nothing of ours to take back
        self._activated = False
        self._running = True
        self._error = None
        self._replace([(now_ms, Step.SEND_DELAYED_LEAVE_NOW)])
        self._log.info("leave")
        self._update_status()

    def observe(self, observation: Observation, now_ms: int) -> None:
        """What the RTC session says about our own membership (call on every change)."""
        if not self._activated:
            return
        if isinstance(observation, OwnMembershipSeen | OwnMembershipExpiredLocally):
            self._created_ts = observation.created_ts
            self._own_event_id = observation.event_id or None
            self._seen_since_join = True
            self._missing_while_busy = False
            # Expired on our clock: refresh at once, unless the session has not yet shown
            # our latest send (that send already extends it).
            at_once = isinstance(observation, OwnMembershipExpiredLocally) and (
                self._last_join_event_id is None
                or observation.event_id in ("", self._last_join_event_id)
            )
            self._refresh_before_own_expiry(now_ms, at_once=at_once)
            return
        # Missing.
        if not self._has_member_event:
            return  # still joining: the queued SEND_DELAYED_LEAVE/SEND_JOIN will add it
        if (
            not observation.after_join
            and not self._seen_since_join
            and self._join_sent_ms is not None
            and now_ms - self._join_sent_ms < self.config.own_membership_grace_ms
        ):
            self._log.debug("own_membership_missing_ignored", reason="join not yet seen in sync")
            return
        if self._in_step(Step.SEND_JOIN):
            return  # the join on its way puts it back
        if self._in_step(Step.SEND_DELAYED_LEAVE):
            # Typically a restart found the delayed leave fired (we were frozen or cut off)
            # and a new one is being scheduled: join right after it, not at the next sync.
            self._missing_while_busy = True
            return
        self._log.warning("own_membership_missing", action="re-join")
        self._forget_membership()
        self._replace([(now_ms, Step.SEND_DELAYED_LEAVE)])
        self._update_status()

    def _refresh_before_own_expiry(self, now_ms: int, *, at_once: bool) -> None:
        """Bring the queued expiry refresh forward to ``_next_refresh_ms`` (which now knows
        ``created_ts``), or to now when our view of our membership has already expired."""
        if self._in_flight is not None and self._in_flight.step in (
            Step.UPDATE_EXPIRY,
            Step.SEND_JOIN,
        ):
            return  # the send on the wire extends it
        queued = [s for s in self._queue if s.step is Step.UPDATE_EXPIRY]
        if not queued:
            return  # not joined yet (the join's success schedules it) or leaving
        due = now_ms if at_once else max(now_ms, self._next_refresh_ms(self._expiry_iterations))
        if queued[0].due_ms <= due:
            return
        self._queue.remove(queued[0])
        self._insert(due, Step.UPDATE_EXPIRY)
        self._log.info(
            "expiry_refresh_advanced",
            reason="our clock is ahead of the homeserver's" if not at_once else "expired locally",
            in_ms=due - now_ms,
        )

    def _in_step(self, step: Step) -> bool:
        """Whether ``step`` is queued or on the wire."""
        return any(s.step is step for s in self._queue) or (
            self._in_flight is not None and self._in_flight.step is step
        )

    def _forget_membership(self) -> None:
        self._has_member_event = False
        self._created_ts = None  # the re-join is a new membership to others
        self._own_event_id = None

    def next_action(self, now_ms: int) -> MembershipAction:
        """The next request to perform, ``Wait`` until something is due, or ``Stopped``."""
        if self._in_flight is not None:
            raise LocalError(
                f"next_action while {type(self._in_flight.request).__name__} awaits its result"
            )
        for _ in range(64):  # internal transitions are few; a loop here would be a bug
            if not self._running:
                return Stopped(self._error)
            if not self._queue:
                self._stop(None)
                continue
            head = min(self._queue)
            if head.due_ms > now_ms:
                return Wait(head.due_ms)
            self._queue.remove(head)
            request = self._start(head.step, now_ms)
            self._update_status()
            if request is not None:
                self._in_flight = _InFlight(head.step, request, self._generation)
                return request
        raise LocalError("membership machine did not settle (internal transition loop)")

    def abandon(self, now_ms: int) -> bool:
        """Stop waiting for the request in flight when ``leave`` (or ``join``) has replaced the
        plan it belonged to: its answer would only update the facts, and on a hung homeserver
        it comes after the request timeout (20 s), holding the leave back all that while. The
        adapter cancels the request and calls this instead of ``receive_result``.

        Its outcome is unknown, so the facts assume what the leave must cover: a join on the
        wire may still land, so the leave takes our membership back (the delayed leave is
        sent now; it fires anyway if the homeserver never answers). It may also land after the
        leave, and then nothing would take it back until it expires (hours): so once the leave
        is out, a delayed leave of ``late_join_sweep_ms`` is scheduled as well, which
        overwrites such a late join (a join of ours within that time is removed by it and
        joins again on seeing itself missing). Returns whether a request was abandoned; one
        of the current plan never is (its answer is still needed).
        """
        flight = self._in_flight
        if flight is None or flight.generation == self._generation:
            return False
        self._in_flight = None
        if isinstance(flight.request, SendJoin):
            self._has_member_event = True
            self._join_abandoned = True
        self._log.info("request_abandoned", step=flight.step.value, at_ms=now_ms)
        self._update_status()
        return True

    def receive_result(self, result: Result, now_ms: int) -> None:
        """The outcome of the request last returned by ``next_action``."""
        flight = self._in_flight
        if flight is None:
            raise LocalError(f"result {type(result).__name__} without a request in flight")
        self._in_flight = None
        stale = flight.generation != self._generation
        try:
            update = self._finish(flight, result, now_ms)
        except _Fatal as fatal:
            if stale:
                self._log.info("stale_failure_ignored", step=flight.step.value, error=str(fatal))
            else:
                self._stop(str(fatal))
            update = None
        if update is not None and not stale:
            kind, steps = update
            if kind == "replace":
                self._replace(steps)
            else:
                for due, step in steps:
                    self._insert(due, step)
        self._update_status()

    # ------------------------------------------------------------------ step starts

    def _start(self, step: Step, now_ms: int) -> Request | None:
        """Turn a due step into a request, or apply an internal transition (None)."""
        match step:
            case Step.SEND_DELAYED_LEAVE:
                if not self._delayed_ok:
                    if not self._has_member_event:
                        self._insert(now_ms, Step.SEND_JOIN)
                    return None
                if self._delay_id is not None:
                    return CancelDelayedLeave(delay_id=self._delay_id)
                return ScheduleDelayedLeave(
                    event_type=self.event_type,
                    state_key=self.state_key,
                    content=self._leave_content(),
                    delay_ms=self.delay_ms,
                    sticky_duration_ms=self._sticky_ms(),
                )
            case Step.SEND_JOIN:
                self._join_iterations = self._periods_lived(now_ms)
                expires = self.config.expiry_ms * self._join_iterations
                return self._join_request(expires, refresh=False)
            case Step.UPDATE_EXPIRY:
                expires = self.config.expiry_ms * (self._expiry_iterations + 1)
                return self._join_request(expires, refresh=True)
            case Step.RESTART_DELAYED_LEAVE:
                if not self._delayed_ok:
                    return None
                if self._delay_id is None:
                    self._insert(now_ms, Step.SEND_DELAYED_LEAVE)
                    return None
                return RestartDelayedLeave(
                    delay_id=self._delay_id, timeout_ms=self._restart_timeout(now_ms)
                )
            case Step.SEND_DELAYED_LEAVE_NOW:
                if not self._has_member_event:
                    self._queue.clear()
                    return None
                if self._delay_id is not None and self._delayed_ok:
                    return SendDelayedLeaveNow(delay_id=self._delay_id)
                self._insert(now_ms, Step.SEND_LEAVE)
                return None
            case Step.SEND_LEAVE:
                if not self._has_member_event:
                    self._queue.clear()
                    return None
                return SendLeave(
                    event_type=self.event_type,
                    state_key=self.state_key,
                    content=self._leave_content(),
                    sticky_duration_ms=self._sticky_ms(),
                )
            case Step.SWEEP_LATE_JOIN:
                return ScheduleDelayedLeave(
                    event_type=self.event_type,
                    state_key=self.state_key,
                    content=self._leave_content(),
                    delay_ms=self.config.late_join_sweep_ms,
                    sticky_duration_ms=self._sticky_ms(),
                )
        raise LocalError(f"unknown step {step!r}")  # pragma: no cover

    def _restart_timeout(self, now_ms: int) -> int:
        local = self.config.restart_local_timeout_ms
        expected = self._expected_leave_ms
        if expected is None or self._probably_left:
            return local
        left = expected - now_ms
        if left <= 0:
            # js-sdk would abort at once and learn this in its error path; say it directly.
            self._set_probably_left(True)
            return local
        return min(local, left)

    # ------------------------------------------------------------------ results

    def _finish(self, flight: _InFlight, result: Result, now_ms: int) -> _Update:
        step = flight.step
        request = flight.request
        if isinstance(request, CancelDelayedLeave):
            return self._finish_cancel(result, now_ms)
        match step:
            case Step.SEND_DELAYED_LEAVE:
                return self._finish_schedule(result, now_ms)
            case Step.SEND_JOIN:
                return self._finish_join(result, now_ms)
            case Step.UPDATE_EXPIRY:
                return self._finish_refresh(result, now_ms)
            case Step.RESTART_DELAYED_LEAVE:
                return self._finish_restart(result, now_ms)
            case Step.SEND_DELAYED_LEAVE_NOW:
                return self._finish_leave_now(result, now_ms)
            case Step.SEND_LEAVE:
                return self._finish_leave(result, now_ms)
            case Step.SWEEP_LATE_JOIN:
                return self._finish_sweep(result, now_ms)
        raise LocalError(f"unknown step {step!r}")  # pragma: no cover

    def _finish_schedule(self, result: Result, now_ms: int) -> _Update:
        step = Step.SEND_DELAYED_LEAVE
        match result:
            case Ok(delay_id=delay_id) if delay_id:
                self._delay_id = delay_id
                self._expected_leave_ms = now_ms + self.delay_ms
                self._set_probably_left(False)
                self._reset_retries(step)
                if self._has_member_event and self._missing_while_busy:
                    self._missing_while_busy = False
                    self._log.warning("own_membership_missing", action="re-join")
                    self._forget_membership()
                    return ("replace", [(now_ms, Step.SEND_JOIN)])
                if self._has_member_event:
                    # Re-scheduled after the server lost it: back to the heartbeat.
                    return (
                        "insert",
                        [
                            (
                                now_ms + self.config.delayed_leave_restart_ms,
                                Step.RESTART_DELAYED_LEAVE,
                            )
                        ],
                    )
                return ("insert", [(now_ms, Step.SEND_JOIN)])
            case MaxDelayExceeded(max_delay_ms=limit) if limit is not None and (
                0 < limit < self.delay_ms
            ):
                self._log.info("delayed_leave_delay_lowered", max_delay_ms=limit)
                self._delay_override_ms = limit
                return ("insert", [(now_ms, step)])
            case RetryAfter() | NetworkError() | LocalTimeout():
                return self._retry(step, result, now_ms)
            case DelayedEventsUnsupported():
                self._delayed_ok = False
                self._log.info("delayed_events_unsupported")
                return None if self._has_member_event else ("insert", [(now_ms, Step.SEND_JOIN)])
            case _:
                if self._has_member_event:
                    raise _Fatal(f"could not schedule the delayed leave: {_describe(result)}")
                # First join: go on without a delayed leave rather than not at all.
                self._delayed_ok = False
                self._log.warning("joining_without_delayed_leave", reason=_describe(result))
                return ("insert", [(now_ms, Step.SEND_JOIN)])

    def _finish_cancel(self, result: Result, now_ms: int) -> _Update:
        step = Step.SEND_DELAYED_LEAVE
        match result:
            case Ok() | NotFound():
                self._delay_id = None
                self._reset_retries(step)
                return ("replace", [(now_ms, step)])
            case RetryAfter() | NetworkError() | LocalTimeout():
                return self._retry(step, result, now_ms)
            case DelayedEventsUnsupported():
                self._delayed_ok = False
                return ("replace", [(now_ms, Step.SEND_JOIN)])
            case _:
                raise _Fatal(f"could not cancel the old delayed leave: {_describe(result)}")

    def _finish_join(self, result: Result, now_ms: int) -> _Update:
        step = Step.SEND_JOIN
        match result:
            case Ok(event_id=event_id):
                self._set_probably_left(False)
                self._has_member_event = True
                self._start_ms = now_ms
                self._expiry_iterations = self._join_iterations
                self._last_join_event_id = event_id
                self._join_sent_ms = now_ms
                self._seen_since_join = False
                self._missing_while_busy = False
                self._reset_retries(step)
                # Drop what this success re-plans, so no step ever runs twice in parallel.
                replanned = (Step.UPDATE_EXPIRY, Step.SEND_JOIN, Step.RESTART_DELAYED_LEAVE)
                kept = [(s.due_ms, s.step) for s in self._queue if s.step not in replanned]
                steps = [
                    *kept,
                    # Old Synapse cancels delayed state when the state is overwritten.
                    (now_ms, Step.RESTART_DELAYED_LEAVE),
                    (self._next_refresh_ms(self._expiry_iterations), Step.UPDATE_EXPIRY),
                ]
                if self._content_dirty:  # update_membership while this was on the wire
                    steps.append((now_ms, Step.SEND_JOIN))
                return ("replace", steps)
            case RetryAfter() | NetworkError() | LocalTimeout():
                return self._retry(step, result, now_ms)
            case _:
                raise _Fatal(f"could not send the join: {_describe(result)}")

    def _finish_refresh(self, result: Result, now_ms: int) -> _Update:
        step = Step.UPDATE_EXPIRY
        match result:
            case Ok(event_id=event_id):
                self._reset_retries(step)
                self._expiry_iterations += 1
                if event_id:
                    self._last_join_event_id = event_id
                steps = [(self._next_refresh_ms(self._expiry_iterations), step)]
                if self._content_dirty:  # update_membership while this was on the wire
                    steps.append((now_ms, Step.SEND_JOIN))
                return ("insert", steps)
            case RetryAfter() | NetworkError() | LocalTimeout():
                return self._retry(step, result, now_ms)
            case _:
                raise _Fatal(f"could not refresh the membership: {_describe(result)}")

    def _finish_restart(self, result: Result, now_ms: int) -> _Update:
        step = Step.RESTART_DELAYED_LEAVE
        if isinstance(result, Ok):
            self._expected_leave_ms = now_ms + self.delay_ms
            self._reset_retries(step)
            self._set_probably_left(False)
            return ("insert", [(now_ms + self.config.delayed_leave_restart_ms, step)])
        if self._expected_leave_ms is not None and self._expected_leave_ms <= now_ms:
            self._set_probably_left(True)
        match result:
            case NotFound():
                self._delay_id = None
                return ("insert", [(now_ms, Step.SEND_DELAYED_LEAVE)])
            case DelayedEventsUnsupported():
                self._delayed_ok = False
                return None
            case RetryAfter() | NetworkError() | LocalTimeout():
                return self._retry(step, result, now_ms)
            case _:
                raise _Fatal(f"could not restart the delayed leave: {_describe(result)}")

    def _finish_leave_now(self, result: Result, now_ms: int) -> _Update:
        match result:
            case Ok():
                self._has_member_event = False
                self._delay_id = None
                self._reset_retries(Step.SEND_DELAYED_LEAVE_NOW)
                return ("replace", self._sweep_steps(now_ms))
            case NotFound():
                self._delay_id = None
                return ("insert", [(now_ms, Step.SEND_LEAVE)])
            case RetryAfter() | NetworkError() | LocalTimeout():
                # js-sdk retries with the plain leave after the back-off.
                return self._retry(Step.SEND_LEAVE, result, now_ms)
            case _:
                return ("insert", [(now_ms, Step.SEND_LEAVE)])

    def _finish_leave(self, result: Result, now_ms: int) -> _Update:
        step = Step.SEND_LEAVE
        match result:
            case Ok():
                self._has_member_event = False
                self._reset_retries(step)
                return ("replace", self._sweep_steps(now_ms))
            case RetryAfter() | NetworkError() | LocalTimeout():
                return self._retry(step, result, now_ms)
            case _:
                raise _Fatal(f"could not send the leave: {_describe(result)}")

    def _sweep_steps(self, now_ms: int) -> list[tuple[int, Step]]:
        """After the leave: the sweep for a join that was abandoned (see :meth:`abandon`);
        without delayed events there is nothing that could run after we are gone."""
        if not self._join_abandoned or not self._delayed_ok:
            return []
        self._join_abandoned = False
        return [(now_ms, Step.SWEEP_LATE_JOIN)]

    def _finish_sweep(self, result: Result, now_ms: int) -> _Update:
        if isinstance(result, Ok):
            # Kept, so a join on this machine within the sweep cancels it first.
            self._delay_id = result.delay_id
            self._log.info("late_join_sweep_scheduled", delay_ms=self.config.late_join_sweep_ms)
        else:
            # One attempt, not retried: the leave itself is done and must not wait on this;
            # a late join, if any, then expires on its own.
            self._log.warning("late_join_sweep_failed", result=_describe(result), at_ms=now_ms)
        return ("replace", [])

    # ------------------------------------------------------------------ helpers

    def _retry(self, step: Step, result: Result, now_ms: int) -> _Update:
        cfg = self.config
        if isinstance(result, RetryAfter):
            n = self._rate_retries.get(step, 0)
            if n >= cfg.max_rate_limit_retries:
                raise _Fatal(f"{step.value}: rate limited {n} times in a row")
            self._rate_retries[step] = n + 1
            wait = result.retry_after_ms
            delay = wait if wait is not None and wait >= 0 else cfg.rate_limit_default_ms
        elif isinstance(result, LocalTimeout):
            # The server took the request and is slow to answer: retry at once, and do not
            # count it towards the budget (released js-sdk 43 does both). Giving up would
            # re-join, a new membership to everyone, only because the homeserver was slow;
            # the delayed leave bounds how long a stalled restart goes unnoticed.
            delay = 0
        else:
            n = self._net_retries.get(step, 0)
            if n >= cfg.max_network_retries:
                raise _Fatal(f"{step.value}: {n} network errors in a row ({_describe(result)})")
            self._net_retries[step] = n + 1
            delay = cfg.network_error_retry_ms
        self._log.info("retry", step=step.value, after_ms=delay, result=_describe(result))
        return ("insert", [(now_ms + delay, step)])

    def _reset_retries(self, step: Step) -> None:
        self._rate_retries[step] = 0
        self._net_retries[step] = 0

    def _next_refresh_ms(self, iteration: int) -> int:
        """When to send refresh ``iteration`` (our clock): one period after the join was
        acknowledged, and never after our own clock would judge the membership expired.

        The state form expires at ``created_ts + expires`` where ``created_ts`` is the
        homeserver's clock and every member compares it with its own (js-sdk, spec
        matrixrtc.md "Clock"). Members with a sound clock see it expire one period after
        the join; a device whose clock runs ahead by more than the headroom would see its
        own membership expire first, and re-join (a new membership to everyone) each period.
        """
        period = min(self.config.expiry_ms, self.config.sticky_duration_ms)
        due = self._start_ms + period * iteration
        if self.dialect is Dialect.STATE and self._created_ts is not None:
            due = min(due, self._created_ts + self.config.expiry_ms * iteration)
        return due - self.config.expiry_headroom_ms

    def _periods_lived(self, now_ms: int) -> int:
        """How many expiry periods a join sent now must cover: 1 for a new membership; for
        one that keeps an old ``created_ts`` (state form: a re-send with new transports, a
        join again after giving up while the room still holds ours), enough that
        ``created_ts + expires`` lies ahead. One period would send a membership already
        expired to everyone once the call is older than the period."""
        if self.dialect is not Dialect.STATE or self._created_ts is None:
            return 1
        return max(1, (now_ms - self._created_ts) // self.config.expiry_ms + 1)

    def _sticky_ms(self) -> int | None:
        return self.config.sticky_duration_ms if self.dialect is Dialect.STICKY else None

    def _leave_content(self) -> JsonDict:
        if self.dialect is Dialect.STICKY:
            return sticky_leave_content(self.member_id, DEFAULT_SLOT_ID)
        return state_leave_content()

    def _join_request(self, expires: int, *, refresh: bool) -> SendJoin:
        self._content_dirty = False
        content: JsonDict
        if self.dialect is Dialect.STICKY:
            content = RtcMemberData.for_join(
                user_id=self.user_id,
                device_id=self.device_id,
                member_id=self.member_id,
                transports=self._transports,
                intent=self._intent,
                # js-sdk references our membership event whenever the session shows it.
                previous_event_id=self._own_event_id
                or (self._last_join_event_id if refresh else None),
            ).to_json()
        else:
            content = SessionMembershipData.for_join(
                user_id=self.user_id,
                device_id=self.device_id,
                transports=self._transports,
                multi_sfu=self._multi_sfu,
                intent=self._intent,
                expires=expires,
                created_ts=self._created_ts,
                room_id=self.room_id,
            ).to_json()
        return SendJoin(
            event_type=self.event_type,
            state_key=self.state_key,
            content=content,
            sticky_duration_ms=self._sticky_ms(),
            refresh=refresh,
        )

    def _insert(self, due_ms: int, step: Step) -> None:
        self._seq += 1
        self._queue.append(_Scheduled(due_ms, self._seq, step))

    def _replace(self, steps: list[tuple[int, Step]]) -> None:
        self._generation += 1
        self._queue.clear()
        for due, step in steps:
            self._insert(due, step)

    def _stop(self, error: str | None) -> None:
        self._running = False
        self._activated = False
        self._queue.clear()
        self._error = error
        if error is not None:
            # Whether this is final is the caller's to say (the agent joins again while still
            # in the call: agent.membership_failed is an error only when it gives up).
            self._log.warning("membership_machine_failed", error=error)
        else:
            self._log.info("membership_machine_stopped")
        self._update_status()

    def _set_probably_left(self, value: bool) -> None:
        if self._probably_left != value:
            self._probably_left = value
            self._events.append(ProbablyLeftChanged(value))
            self._log.info("probably_left", value=value)

    def _update_status(self) -> None:
        if not self._running:
            new = MembershipStatus.FAILED if self._error else MembershipStatus.DISCONNECTED
        elif not self._activated:
            new = MembershipStatus.DISCONNECTING
        elif self._probably_left:
            new = MembershipStatus.RECONNECTING
        elif not self._has_member_event:
            new = MembershipStatus.CONNECTING
        else:
            new = MembershipStatus.CONNECTED
        if new != self._status:
            self._events.append(StatusChanged(self._status, new))
            self._log.info("status", old=self._status.value, new=new.value)
            self._status = new


def _describe(result: Result) -> str:
    match result:
        case Rejected(errcode=code, reason=reason):
            return f"Rejected({code}{': ' + reason if reason else ''})"
        case NetworkError(reason=reason) if reason:
            return f"NetworkError({reason})"
    return type(result).__name__
