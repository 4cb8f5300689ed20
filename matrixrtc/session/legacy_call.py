"""The 2022 MSC3401 group call of one room (Hydrogen, legacy js-sdk ``GroupCall``), pure.

Theory of operation
-------------------
:class:`LegacyCallSession` reads the room's ``org.matrix.msc3401.call`` and 2022-form
``org.matrix.msc3401.call.member`` state (any order, the latest per state key wins) and the
joined users, and answers: which call the room has (:attr:`call`, js-sdk's choice), and
which devices are in it now (:meth:`devices`), with their MSC2746 session ids: exactly the
input :class:`~matrixrtc.session.mesh_signalling.MeshSignalling` needs, under the call's
``conf_id``.

:class:`LegacyMembership` is our own device's membership in that call, a small state machine
driven by an injected time (``now_ms``) that returns :class:`PutState` actions and never
does I/O:

==========  ==========================  =============================================
state       input                       actions, next state
==========  ==========================  =============================================
IDLE        ``join``                    [create the call if the room has none] + put
                                        our entry (read-modify-write) -> JOINED
JOINED      ``tick`` at renew time      put our entry again, ``expires_ts`` renewed
                                        (every 45 min, expiry 1 h: js-sdk's numbers)
JOINED      our entry vanished          put it again (another client of ours rewrote
            (``observe``)               the event without it)
JOINED      ``leave``                   put the event without our entry -> LEFT
LEFT/IDLE   ``tick``/``observe``        nothing
==========  ==========================  =============================================

Every put is computed from the latest content of our user's event that the session has
seen (:func:`~matrixrtc.model.msc3401_2022.update_member_content`): other devices' and other
calls' entries survive, our user's expired entries are dropped.

Dialect choice (:func:`choose_write_dialect`): ``state`` | ``sticky`` | ``msc3401_2022`` |
``auto``. ``auto`` writes what the call's other members use: the dialect of most other
members (ties: state, then sticky, then 2022), ``state`` when nobody else is there. A call
may mix dialects on the mesh; each member is read in its own.
"""

from __future__ import annotations

import enum
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import structlog

from matrixrtc.model._json import JsonDict, as_str, get_dict
from matrixrtc.model.msc3401_2022 import (
    DEVICE_TIMEOUT_MS,
    GROUP_CALL_EVENT,
    MEMBER_EVENT,
    RENEW_AFTER_MS,
    GroupCall,
    GroupCallIntent,
    GroupCallType,
    LegacyDevice,
    MemberEvent,
    choose_group_call,
    new_group_call_content,
    parse_group_call_event,
    parse_member_event,
    update_member_content,
)

__all__ = [
    "LegacyCallSession",
    "LegacyMember",
    "LegacyMembership",
    "LegacyMembershipState",
    "PutState",
    "WriteDialect",
    "WritePlan",
    "choose_write_dialect",
    "needs_legacy_entry",
    "new_conf_id",
    "new_session_id",
    "plan_write",
]

_log = structlog.get_logger(__name__)

_TIE_ORDER: Final = ("state", "sticky", "msc3401_2022")


class WriteDialect(enum.StrEnum):
    """Which membership form we write; ``AUTO`` follows the call's other members."""

    STATE = "state"  # org.matrix.msc3401.call.member per device (Element Call)
    STICKY = "sticky"  # org.matrix.msc4143.rtc.member sticky (Element Call matrix_2_0)
    MSC3401_2022 = "msc3401_2022"  # m.calls per user (Hydrogen, legacy js-sdk GroupCall)
    AUTO = "auto"


def choose_write_dialect(configured: WriteDialect, others: Iterable[str]) -> WriteDialect:
    """The concrete dialect to write. ``others``: the dialect (``"state"``, ``"sticky"`` or
    ``"msc3401_2022"``) of each *other* active member of the call."""
    if configured is not WriteDialect.AUTO:
        return configured
    counts = Counter(d for d in others if d in _TIE_ORDER)
    if not counts:
        return WriteDialect.STATE
    best = max(_TIE_ORDER, key=lambda d: (counts[d], -_TIE_ORDER.index(d)))
    return WriteDialect(best)


@dataclass(frozen=True, slots=True)
class WritePlan:
    """What our device writes: a current-dialect membership (``current``: STATE or STICKY,
    None for none) and/or an entry in the room's 2022 call (``legacy``)."""

    current: WriteDialect | None
    legacy: bool


def plan_write(configured: WriteDialect, others: Iterable[str]) -> WritePlan:
    """The forms to write when joining. ``others``: the dialect of each other active member.

    A fixed choice writes that one form. ``AUTO``: when there are others and every one of
    them is in the 2022 dialect, only the 2022 entry (as they do); otherwise the current
    dialect most others use (ties and nobody: state), *plus* a 2022 entry as soon as any
    other member is 2022-only (:func:`needs_legacy_entry`): Hydrogen and legacy js-sdk see
    (and send media to) only members listed in ``m.calls``.
    """
    if configured is WriteDialect.MSC3401_2022:
        return WritePlan(None, True)
    if configured is not WriteDialect.AUTO:
        return WritePlan(configured, False)
    seen = [d for d in others if d in _TIE_ORDER]
    if seen and all(d == WriteDialect.MSC3401_2022 for d in seen):
        return WritePlan(None, True)
    current = choose_write_dialect(
        WriteDialect.AUTO, [d for d in seen if d != WriteDialect.MSC3401_2022]
    )
    return WritePlan(current, needs_legacy_entry(seen))


def needs_legacy_entry(others: Iterable[str]) -> bool:
    """Whether an ``AUTO`` member writing a current dialect must also list itself in the
    room's 2022 call: some other member is 2022-only."""
    return any(d == WriteDialect.MSC3401_2022 for d in others)


def new_session_id() -> str:
    """A session id as js-sdk makes one per client load (10 random characters)."""
    return secrets.token_urlsafe(8)[:10]


def new_conf_id() -> str:
    """A fresh group call id for a room that has no call yet."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True, kw_only=True)
class LegacyMember:
    """One device in the call, as the mesh needs it."""

    user_id: str
    device_id: str
    session_id: str
    expires_ts: int
    feeds: tuple[str, ...]
    event_id: str = ""  # of the user's member event that lists the device
    origin_server_ts: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PutState:
    """Send a state event (``PUT /rooms/{room}/state/{type}/{state_key}``)."""

    event_type: str
    state_key: str
    content: JsonDict


class LegacyCallSession:
    """The room's 2022 call and its devices (see the module doc). Pure; never raises on
    input."""

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self._calls: dict[str, GroupCall] = {}
        self._members: dict[str, MemberEvent] = {}
        self._contents: dict[str, JsonDict] = {}  # user id -> raw 2022 content
        self._joined: frozenset[str] | None = None  # None: not known, nobody filtered

    def receive_state_event(self, event: object) -> bool:
        """One state event of any type; returns whether it was a 2022-call event."""
        ev = get_dict(event)
        if ev is None:
            return False
        etype, state_key = ev.get("type"), as_str(ev.get("state_key"))
        if state_key is None:
            return False
        if etype == GROUP_CALL_EVENT:
            call = parse_group_call_event(ev)
            if call is None:
                self._calls.pop(state_key, None)  # the latest event at the key is no call
            else:
                self._calls[state_key] = call
            return True
        if etype == MEMBER_EVENT and state_key == ev.get("sender"):
            # The per-user key is the 2022 form; today's state form keys by device.
            member = parse_member_event(ev)
            if member is None:
                self._members.pop(state_key, None)
                self._contents.pop(state_key, None)
            else:
                self._members[state_key] = member
                self._contents[state_key] = dict(get_dict(ev.get("content")) or {})
            return True
        return False

    def set_joined_members(self, user_ids: Iterable[str]) -> None:
        self._joined = frozenset(user_ids)

    @property
    def call(self) -> GroupCall | None:
        """The room's live call as js-sdk chooses it, or None."""
        return choose_group_call(self._calls.values())

    @property
    def conf_id(self) -> str | None:
        call = self.call
        return None if call is None else call.conf_id

    def own_content(self, user_id: str) -> JsonDict | None:
        """The latest content of ``user_id``'s 2022 member event (for read-modify-write)."""
        content = self._contents.get(user_id)
        return None if content is None else dict(content)

    def devices(self, now_ms: int) -> tuple[LegacyMember, ...]:
        """Unexpired, valid devices of joined users in the room's call, sorted."""
        conf_id = self.conf_id
        if conf_id is None:
            return ()
        out: list[LegacyMember] = []
        for user_id, event in self._members.items():
            if self._joined is not None and user_id not in self._joined:
                continue
            for d in event.devices_in(conf_id, now_ms):
                out.append(
                    LegacyMember(
                        user_id=user_id,
                        device_id=d.device_id,
                        session_id=d.session_id,
                        expires_ts=d.expires_ts,
                        feeds=d.feeds,
                        event_id=event.event_id,
                        origin_server_ts=event.origin_server_ts,
                    )
                )
        return tuple(sorted(out, key=lambda m: (m.user_id, m.device_id)))

    def has_device(self, user_id: str, device_id: str, session_id: str, now_ms: int) -> bool:
        return any(
            m.user_id == user_id and m.device_id == device_id and m.session_id == session_id
            for m in self.devices(now_ms)
        )

    def next_wakeup_ms(self, now_ms: int) -> int | None:
        """When a listed device expires next (call :meth:`devices` again then)."""
        times = [m.expires_ts for m in self.devices(now_ms)]
        return min(times) if times else None


class LegacyMembershipState(enum.Enum):
    IDLE = "idle"
    JOINED = "joined"
    LEFT = "left"


class LegacyMembership:
    """Our device's entry in the room's 2022 call (see the module doc's table)."""

    def __init__(
        self,
        session: LegacyCallSession,
        *,
        user_id: str,
        device_id: str,
        session_id: str,
        feeds: tuple[str, ...] = ("m.usermedia",),
        call_type: GroupCallType = GroupCallType.VIDEO,
        new_conf_id: str | None = None,
    ) -> None:
        self.session = session
        self.user_id = user_id
        self.device_id = device_id
        self.session_id = session_id
        self.feeds = feeds
        self.call_type = call_type
        self._new_conf_id = new_conf_id
        self.state = LegacyMembershipState.IDLE
        self.conf_id: str | None = None
        self._written_at: int | None = None
        self._log = _log.bind(room_id=session.room_id, device_id=device_id)

    def _entry(self, now_ms: int) -> LegacyDevice:
        return LegacyDevice(
            device_id=self.device_id,
            session_id=self.session_id,
            expires_ts=now_ms + DEVICE_TIMEOUT_MS,
            feeds=self.feeds,
        )

    def _put(self, now_ms: int, *, with_us: bool) -> PutState:
        assert self.conf_id is not None
        content = update_member_content(
            self.session.own_content(self.user_id),
            conf_id=self.conf_id,
            device_id=self.device_id,
            own=self._entry(now_ms) if with_us else None,
            now_ms=now_ms,
        )
        self._written_at = now_ms
        return PutState(event_type=MEMBER_EVENT, state_key=self.user_id, content=content)

    def join(self, now_ms: int) -> list[PutState]:
        """Enter the room's call (creating one if the room has none)."""
        if self.state is not LegacyMembershipState.IDLE:
            return []
        actions: list[PutState] = []
        self.conf_id = self.session.conf_id
        if self.conf_id is None:
            self.conf_id = self._new_conf_id or new_conf_id()
            content = new_group_call_content(call_type=self.call_type, intent=GroupCallIntent.ROOM)
            actions.append(
                PutState(event_type=GROUP_CALL_EVENT, state_key=self.conf_id, content=content)
            )
        self.state = LegacyMembershipState.JOINED
        self._log.info("legacy_call.join", conf_id=self.conf_id, created=bool(actions))
        actions.append(self._put(now_ms, with_us=True))
        return actions

    def observe(self, now_ms: int) -> list[PutState]:
        """The session changed: put our entry back if our user's event lost it."""
        if self.state is not LegacyMembershipState.JOINED or self._written_at is None:
            return []
        if self.session.own_content(self.user_id) is None:
            return []  # our own write has not come back yet
        if self.session.conf_id != self.conf_id:
            return []  # the call we joined is not (or no longer) the room's: nothing to mend
        if self.session.has_device(self.user_id, self.device_id, self.session_id, now_ms):
            return []
        self._log.info("legacy_call.entry_lost", conf_id=self.conf_id)
        return [self._put(now_ms, with_us=True)]

    def set_session_id(self, session_id: str, now_ms: int) -> list[PutState]:
        """Our mesh session changed (a dual writer re-joined in its current dialect): list the
        new session id, so 2022 readers address it."""
        if session_id == self.session_id:
            return []
        self.session_id = session_id
        if self.state is not LegacyMembershipState.JOINED:
            return []
        return [self._put(now_ms, with_us=True)]

    def tick(self, now_ms: int) -> list[PutState]:
        if self.state is not LegacyMembershipState.JOINED or self._written_at is None:
            return []
        if now_ms < self._written_at + RENEW_AFTER_MS:
            return []
        return [self._put(now_ms, with_us=True)]

    def next_wakeup_ms(self) -> int | None:
        if self.state is not LegacyMembershipState.JOINED or self._written_at is None:
            return None
        return self._written_at + RENEW_AFTER_MS

    def leave(self, now_ms: int) -> list[PutState]:
        if self.state is not LegacyMembershipState.JOINED:
            self.state = LegacyMembershipState.LEFT
            return []
        self.state = LegacyMembershipState.LEFT
        self._log.info("legacy_call.leave", conf_id=self.conf_id)
        return [self._put(now_ms, with_us=False)]
