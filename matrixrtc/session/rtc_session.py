"""The RTC session of one room and slot: room events in, ordered active memberships out.

Pure and synchronous; the caller passes the current time. The pipeline is js-sdk's
``MatrixRTCSession`` (spec/matrixrtc.md §1.3) with a deterministic tie-break.

Public API::

    s = RTCSession(room_id, slot_id="m.call#ROOM", room_version=None)
    rest = s.receive_room_update(state=..., timeline=..., sticky=..., now_ms=...)
                                            # one sync update, raw events routed to the
                                            # inputs below; returns the timeline events
                                            # the session does not use (declines, ...)
    s.receive_state_event(event)            # org.matrix.msc3401.call.member state (any content)
    s.receive_sticky_event(event, now_ms)   # org.matrix.msc4143.rtc.member sticky room event
    s.receive_redaction(redacted_event_id)
    s.receive_member_event(event)           # m.room.member state, or:
    s.receive_slot_event(event)             # org.matrix.msc4143.rtc.slot state (our slot id)
    s.slot_status                           # OPEN | CLOSED | UNKNOWN (js-sdk isSlotClosed)
    s.set_joined_members(user_ids)          # replace the whole joined set
    changes = s.update(now_ms)              # MembershipChanges, or None if nothing changed
    s.memberships                           # ordered (oldest first) active CallMemberships
    s.oldest, s.own_membership(user, device)
    s.next_wakeup_ms()                      # earliest expiry to call update() again at

Feed events in stream order (state: the latest per state key wins; the adapter must pass
state from ``state``/``state_after`` and timeline in order). Nothing here raises on bad input;
invalid events are logged by the parsers and count as "no membership at that key".

Rules (each one a test in tests/unit/test_session_*.py):
1. Collect active sticky members, plus state-form members whose state key is not the
   ``msc4354_sticky_key`` of any active sticky event (js-sdk's precedence rule).
   A closed slot (``org.matrix.msc4143.rtc.slot`` at our slot id, js-sdk 43) contributes
   no sticky members at all; state-form members still count.
2. Keep a membership only if its slot's id part equals ours (js-sdk ignores the application
   part), it has not expired at ``now_ms``
   (state form: ``created_ts + expires <= now`` is expired) and its sender is joined.
3. Order by ``created_ts``, then sender, device id, event id (js-sdk has no tie-break; any
   fixed rule makes every client agree on the oldest member).
4. ``update`` returns a diff keyed by :class:`MembershipKey` only when something changed.

A hostile room (issue 18) cannot make the store grow without bound or flood the log: a sender
holds at most :data:`MAX_STICKY_KEYS_PER_SENDER` sticky keys (a new one beyond is dropped;
js-sdk has no bound), each key keeps its :data:`MAX_STICKY_HISTORY` latest events, content
larger than a Matrix event may be (:data:`MAX_CONTENT_BYTES`) is no membership, and each
rejection is logged through the per-sender :class:`RejectionLog` (once a minute).

Sticky events are kept like js-sdk's ``RoomStickyEventsStore``: per (sender, sticky key) the
event with the latest ``origin_server_ts`` (then the greatest event id) is current,
even when its content is invalid (then that member is simply not listed); a redaction reverts
to the previous event; expired events are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import structlog

from matrixrtc.model._json import JsonDict, as_int, as_str, get_dict, is_mxid
from matrixrtc.model.event_types import EventType
from matrixrtc.model.livekit_ids import DEFAULT_SLOT_ID
from matrixrtc.model.membership import (
    CallMembership,
    MembershipLeft,
    parse_membership_event,
)
from matrixrtc.model.msc4354 import (
    MAX_STICKY_DURATION_MS,
    STICKY_KEY_FIELD,
    sticky_duration_ms,
    sticky_expires_at,
)
from matrixrtc.model.rejections import MEMBERSHIP_REJECTIONS, RejectionLog
from matrixrtc.model.slot import SlotStatus, slot_status

__all__ = [
    "MAX_CONTENT_BYTES",
    "MAX_STICKY_DURATION_MS",
    "MAX_STICKY_HISTORY",
    "MAX_STICKY_KEYS_PER_SENDER",
    "MembershipChanges",
    "RTCSession",
    "StickyEntry",
    "membership_sort_key",
    "redacted_event_id",
    "sticky_duration_ms",
    "sticky_expires_at",
]

_log = structlog.get_logger(__name__)

MAX_STICKY_KEYS_PER_SENDER: Final = 64  # devices (member ids) one user may be in a call with
MAX_STICKY_HISTORY: Final = 8  # events kept per sticky key (a redaction reverts to the next)
MAX_CONTENT_BYTES: Final = 65_536  # the Matrix limit of a whole event; content cannot be more
_LOG_IDS: Final = 20  # identities listed in one memberships_changed line


def _oversized(ev: Mapping[str, object]) -> bool:
    content = ev.get("content")
    if not isinstance(content, dict):
        return False
    try:
        size = len(json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError, RecursionError):
        return True
    return size > MAX_CONTENT_BYTES


def _slot_local_id(slot_id: str) -> str | None:
    """The id part of ``{application}#{id}``; None if malformed (js-sdk throws and drops it).

    js-sdk's ``isValidMembership`` compares only this part, not the application.
    """
    parts = slot_id.split("#")
    return parts[1] if len(parts) == 2 else None


def redacted_event_id(event: Mapping[str, object]) -> str | None:
    """The event id an ``m.room.redaction`` removes: ``content.redacts`` (room v11 and later)
    or the top-level ``redacts`` (earlier versions; servers may send both). None when the
    event is no redaction or names no event."""
    if event.get("type") != EventType.ROOM_REDACTION:
        return None
    content = get_dict(event.get("content")) or {}
    return as_str(content.get("redacts")) or as_str(event.get("redacts"))


def membership_sort_key(m: CallMembership) -> tuple[int, str, str, str]:
    """Oldest first; ties broken by sender, device, event id so all clients agree."""
    return (m.created_ts, m.sender, m.device_id, m.event_id)


@dataclass(frozen=True, slots=True)
class StickyEntry:
    """One sticky event held by the store (join, leave, or invalid)."""

    event_id: str
    origin_server_ts: int
    duration_ms: int
    expires_at: int
    sticky_key: str
    parsed: CallMembership | MembershipLeft | None  # None: invalid, holds the key empty

    @property
    def rank(self) -> tuple[int, str]:
        # js-sdk RoomStickyEventsStore: the latest origin_server_ts wins, then the greatest id.
        return (self.origin_server_ts, self.event_id)


@dataclass(frozen=True, slots=True)
class MembershipChanges:
    """What ``update`` changed. ``memberships`` is the new ordered list."""

    joined: tuple[CallMembership, ...]
    left: tuple[CallMembership, ...]
    updated: tuple[tuple[CallMembership, CallMembership], ...]  # (old, new)
    memberships: tuple[CallMembership, ...]
    previous: tuple[CallMembership, ...] = field(default=())

    @property
    def session_started(self) -> bool:
        """Members went 0 -> >=1 (a ring notification is due if we caused it)."""
        return not self.previous and bool(self.memberships)

    @property
    def session_ended(self) -> bool:
        return bool(self.previous) and not self.memberships

    @property
    def rejoined(self) -> tuple[CallMembership, ...]:
        """Updated memberships whose ``created_ts`` changed: a new membership at the same key
        (js-sdk treats this as leave + join and rotates media keys). Refreshes keep it."""
        return tuple(new for old, new in self.updated if old.created_ts != new.created_ts)

    @property
    def order_changed(self) -> bool:
        return [m.key for m in self.previous] != [m.key for m in self.memberships]


class RTCSession:
    """Membership view of one MatrixRTC slot in one room (see module docstring)."""

    def __init__(
        self,
        room_id: str,
        *,
        slot_id: str = DEFAULT_SLOT_ID,
        room_version: str | None = None,
        default_sticky_duration_ms: int | None = None,
        rejections: RejectionLog = MEMBERSHIP_REJECTIONS,
    ) -> None:
        self.room_id = room_id
        self._rejections = rejections
        self._keys_per_sender: dict[str, int] = {}
        self.slot_id = slot_id
        self.room_version = room_version
        # Used only when a sticky event carries neither duration nor TTL (js-sdk drops it).
        self.default_sticky_duration_ms = default_sticky_duration_ms
        self._raw_state: dict[str, JsonDict] = {}
        self._slot_content: JsonDict | None = None  # our slot's rtc.slot state, if any
        self._state: dict[str, CallMembership | MembershipLeft | None] = {}
        self._state_event_ids: dict[str, str] = {}
        self._sticky: dict[tuple[str, str], list[StickyEntry]] = {}
        self._joined: set[str] = set()
        self._memberships: tuple[CallMembership, ...] = ()
        # Local clock minus the homeserver's (matrixrtc.session.server_clock): state-form
        # expiry is judged on the homeserver's clock.
        self.clock_offset_ms = 0
        self._log = _log.bind(room_id=room_id, slot_id=slot_id)

    # ----------------------------------------------------------------------- inputs

    def receive_room_update(
        self,
        *,
        state: Iterable[object] = (),
        timeline: Iterable[object] = (),
        sticky: Iterable[object] = (),
        now_ms: int,
        left: bool = False,
    ) -> tuple[JsonDict, ...]:
        """One sync update of the room, raw events in stream order, routed to the inputs:
        ``state`` (the state section, then the timeline's state events: ``m.room.create``,
        call memberships, ``m.room.member``), ``sticky`` (MSC4354 sticky events, received at
        ``now_ms``) and ``timeline`` (redactions). ``left``: we are no longer joined, so
        nobody counts as joined. Returns the timeline events the session does not use, in
        order, for the caller (declines, notifications). Call :meth:`update` afterwards."""
        if left:
            self.set_joined_members(())
        events = [ev for ev in map(get_dict, state) if ev is not None]
        for ev in events:  # the version decides how the other state keys parse
            if ev.get("type") == EventType.ROOM_CREATE:
                content = get_dict(ev.get("content")) or {}
                self.set_room_version(as_str(content.get("room_version")) or "1")
        for ev in events:
            etype = ev.get("type")
            if etype == EventType.CALL_MEMBER:
                self.receive_state_event(ev)
            elif etype == EventType.ROOM_MEMBER:
                self.receive_member_event(ev)
            elif etype == EventType.RTC_SLOT:
                self.receive_slot_event(ev)
        for raw in sticky:
            sticky_ev = get_dict(raw)
            if sticky_ev is not None and sticky_ev.get("type") == EventType.RTC_MEMBER:
                self.receive_sticky_event(sticky_ev, now_ms)
        rest: list[JsonDict] = []
        for raw in timeline:
            timeline_ev = get_dict(raw)
            if timeline_ev is None:
                continue
            if timeline_ev.get("type") == EventType.ROOM_REDACTION:
                redacted = redacted_event_id(timeline_ev)
                if redacted is not None:
                    self.receive_redaction(redacted)
            else:
                rest.append(timeline_ev)
        return tuple(rest)

    def receive_slot_event(self, event: object) -> None:
        """``org.matrix.msc4143.rtc.slot`` state; only the one keyed by our slot id counts."""
        ev = get_dict(event)
        if ev is None or ev.get("type") != EventType.RTC_SLOT:
            return
        if ev.get("state_key") != self.slot_id:
            return
        content = get_dict(ev.get("content"))
        before = self.slot_status
        self._slot_content = content if content is not None else {}
        if self.slot_status is not before:
            self._log.info("slot_status", old=before.value, new=self.slot_status.value)

    @property
    def slot_status(self) -> SlotStatus:
        """Our slot: OPEN, CLOSED (its sticky memberships are ignored) or UNKNOWN (no event)."""
        application = self.slot_id.split("#", 1)[0]
        return slot_status(self._slot_content, application)

    @property
    def slot_content(self) -> JsonDict | None:
        """Our slot's state content (None: no slot event), e.g. to open it keeping the rest."""
        return self._slot_content

    def state_event(self, state_key: str) -> JsonDict | None:
        """The raw ``call.member`` event held at ``state_key`` (None: none)."""
        return self._raw_state.get(state_key)

    def set_room_version(self, room_version: str | None) -> None:
        """Room version from ``m.room.create``; decides whether ``@…`` state keys are owned."""
        self.room_version = room_version
        # Re-parse: ownership of `@user…` keys depends on the version.
        for event in list(self._raw_state.values()):
            self.receive_state_event(event)

    def receive_state_event(self, event: object) -> None:
        """Latest state at one ``org.matrix.msc3401.call.member`` state key (any content)."""
        ev = get_dict(event)
        if ev is None or ev.get("type") != EventType.CALL_MEMBER:
            self._log.debug("state_event_ignored", reason="not a call.member event")
            return
        state_key = as_str(ev.get("state_key"))
        if state_key is None:
            self._log.debug("state_event_ignored", reason="no string state_key")
            return
        self._raw_state[state_key] = ev
        if _oversized(ev):
            self._reject(ev, "content larger than a Matrix event may be")
            self._state[state_key] = None
        else:
            self._state[state_key] = parse_membership_event(
                ev, self.room_version, rejections=self._rejections
            )
        event_id = as_str(ev.get("event_id"))
        if event_id is not None:
            self._state_event_ids[state_key] = event_id

    def receive_sticky_event(self, event: object, now_ms: int) -> None:
        """A sticky ``org.matrix.msc4143.rtc.member`` event (from sync or the timeline)."""
        ev = get_dict(event)
        if ev is None or ev.get("type") != EventType.RTC_MEMBER:
            self._log.debug("sticky_event_ignored", reason="not an rtc.member event")
            return
        too_big = _oversized(ev)
        if too_big:
            self._reject(ev, "content larger than a Matrix event may be")
        parsed = (
            None
            if too_big
            else parse_membership_event(ev, self.room_version, rejections=self._rejections)
        )
        sender: str | None
        sticky_key: str | None
        event_id: str | None
        ots: int | None
        if parsed is not None:
            sender, sticky_key = parsed.key.sender, parsed.key.key
            event_id, ots = parsed.event_id, parsed.origin_server_ts
        else:
            # An invalid event still takes its key's place in the sticky store (as in js-sdk),
            # so a member whose latest event is junk is not listed from an older one.
            content = get_dict(ev.get("content")) or {}
            sender = as_str(ev.get("sender"))
            sticky_key = as_str(content.get(STICKY_KEY_FIELD)) or as_str(content.get("sticky_key"))
            event_id = as_str(ev.get("event_id"))
            ots = as_int(ev.get("origin_server_ts"))
        if sender is None or not is_mxid(sender) or sticky_key is None:
            return
        if event_id is None or ots is None:
            return
        expires_at = sticky_expires_at(ev, now_ms, self.default_sticky_duration_ms)
        if expires_at is None:
            self._log.debug("sticky_event_ignored", reason="no msc4354_sticky.duration_ms")
            return
        if expires_at <= now_ms:
            self._log.debug("sticky_event_ignored", reason="already expired")
            return
        duration = sticky_duration_ms(ev, self.default_sticky_duration_ms) or 0
        key = (sender, sticky_key)
        held = self._sticky.get(key)
        if held is None:
            if self._keys_per_sender.get(sender, 0) >= MAX_STICKY_KEYS_PER_SENDER:
                self._reject(ev, f"more than {MAX_STICKY_KEYS_PER_SENDER} sticky keys")
                return
            self._keys_per_sender[sender] = self._keys_per_sender.get(sender, 0) + 1
        entries = [e for e in held or [] if e.event_id != event_id]
        entries.append(StickyEntry(event_id, ots, duration, expires_at, sticky_key, parsed))
        entries.sort(key=lambda e: e.rank, reverse=True)
        self._sticky[key] = entries[:MAX_STICKY_HISTORY]

    def _reject(self, ev: Mapping[str, object], reason: str) -> None:
        sender = as_str(ev.get("sender")) or "?"
        self._rejections.rejected(
            kind=as_str(ev.get("type")) or "?",
            sender=sender,
            field=None,
            reason=reason,
            event_id=as_str(ev.get("event_id")),
            room_id=self.room_id,
        )

    def _forget_sticky(self, key: tuple[str, str]) -> None:
        del self._sticky[key]
        left = self._keys_per_sender.get(key[0], 0) - 1
        if left > 0:
            self._keys_per_sender[key[0]] = left
        else:
            self._keys_per_sender.pop(key[0], None)

    def receive_redaction(self, redacted_event_id: str) -> None:
        """A redaction: a sticky key reverts to its previous event; a state event's content
        is gone (the server sends the redacted state event too, which also clears it)."""
        for key, entries in list(self._sticky.items()):
            kept = [e for e in entries if e.event_id != redacted_event_id]
            if len(kept) != len(entries):
                if kept:
                    self._sticky[key] = kept
                else:
                    self._forget_sticky(key)
        for state_key, event_id in list(self._state_event_ids.items()):
            if event_id == redacted_event_id:
                self._state[state_key] = None

    def receive_member_event(self, event: object) -> None:
        """An ``m.room.member`` state event: track who is currently joined."""
        ev = get_dict(event)
        if ev is None or ev.get("type") != EventType.ROOM_MEMBER:
            return
        user_id = as_str(ev.get("state_key"))
        content = get_dict(ev.get("content"))
        if user_id is None or content is None:
            self._log.debug("member_event_ignored", reason="malformed m.room.member")
            return
        if content.get("membership") == "join":
            self._joined.add(user_id)
        else:
            self._joined.discard(user_id)

    def set_joined_members(self, user_ids: Iterable[str]) -> None:
        self._joined = set(user_ids)

    # ---------------------------------------------------------------------- outputs

    @property
    def memberships(self) -> tuple[CallMembership, ...]:
        """Active memberships as of the last ``update``, oldest first."""
        return self._memberships

    @property
    def oldest(self) -> CallMembership | None:
        return self._memberships[0] if self._memberships else None

    @property
    def joined_members(self) -> frozenset[str]:
        return frozenset(self._joined)

    def own_membership(self, user_id: str, device_id: str) -> CallMembership | None:
        """Our own active membership (js ``isMyMembership``: sender and device match)."""
        for m in self._memberships:
            if m.sender == user_id and m.device_id == device_id:
                return m
        return None

    def held_state_membership(self, state_key: str) -> CallMembership | None:
        """The state-form membership held at ``state_key`` whether or not it has expired
        (None: nothing there, a leave, or not a membership)."""
        parsed = self._state.get(state_key)
        return parsed if isinstance(parsed, CallMembership) else None

    def next_wakeup_ms(self) -> int | None:
        """Earliest time at which ``update`` may give a different answer without new input:
        the soonest state-form expiry or sticky expiry among held events."""
        times: list[int] = []
        for parsed in self._state.values():
            if isinstance(parsed, CallMembership) and parsed.expires_at is not None:
                times.append(parsed.expires_at + self.clock_offset_ms)
        for entries in self._sticky.values():
            times.extend(e.expires_at for e in entries)
        return min(times) if times else None

    def update(self, now_ms: int) -> MembershipChanges | None:
        """Recompute the active memberships; a diff if anything changed, else None."""
        self._prune_sticky(now_ms)
        current = self._compute(now_ms)
        previous = self._memberships
        if current == previous:
            return None
        old = {m.key: m for m in previous}
        new = {m.key: m for m in current}
        joined = tuple(m for m in current if m.key not in old)
        left = tuple(m for m in previous if m.key not in new)
        updated = tuple((old[m.key], m) for m in current if m.key in old and old[m.key] != m)
        self._memberships = current
        changes = MembershipChanges(
            joined=joined, left=left, updated=updated, memberships=current, previous=previous
        )
        self._log.info(  # at most _LOG_IDS identities each: a 10 000-member room is one line
            "memberships_changed",
            joined=[m.rtc_backend_identity for m in joined[:_LOG_IDS]],
            left=[m.rtc_backend_identity for m in left[:_LOG_IDS]],
            updated=[n.rtc_backend_identity for _, n in updated[:_LOG_IDS]],
            n_joined=len(joined),
            n_left=len(left),
            n_updated=len(updated),
            count=len(current),
        )
        return changes

    # ---------------------------------------------------------------------- internals

    def _prune_sticky(self, now_ms: int) -> None:
        for key, entries in list(self._sticky.items()):
            kept = [e for e in entries if e.expires_at > now_ms]
            if not kept:
                self._forget_sticky(key)
            elif len(kept) != len(entries):
                self._sticky[key] = kept

    def _candidates(self) -> list[CallMembership]:
        # js-sdk 43 collectMembersEvents: a closed slot's sticky memberships are not collected
        # at all (so they do not hide state memberships at their sticky key either).
        closed = self.slot_status is SlotStatus.CLOSED
        current = [] if closed else [entries[0] for entries in self._sticky.values()]
        sticky_keys = {e.sticky_key for e in current}
        out = [e.parsed for e in current if isinstance(e.parsed, CallMembership)]
        for state_key, parsed in self._state.items():
            if state_key in sticky_keys:
                continue
            if isinstance(parsed, CallMembership):
                out.append(parsed)
        return out

    def _compute(self, now_ms: int) -> tuple[CallMembership, ...]:
        keep: list[CallMembership] = []
        ours = _slot_local_id(self.slot_id)
        for m in self._candidates():
            if _slot_local_id(m.slot_id) != ours:
                continue
            if m.is_expired(now_ms - self.clock_offset_ms):
                continue
            if m.sender not in self._joined:
                continue
            keep.append(m)
        keep.sort(key=membership_sort_key)
        return tuple(keep)
