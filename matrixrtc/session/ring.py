"""Ringing (MSC4075 notifications, MSC4310 declines) as pure state machines.

**Outgoing** (:class:`OutgoingRing`, Element Call's caller): the first joiner of a call rings
the room once; the ring ends ANSWERED when someone else joins, DECLINED once every rung user
(the room's other joined members at ring time) declined, EXPIRED when its lifetime passes.

    ring = OutgoingRing(own_user_id)
    ring.should_ring(enabled=…, memberships=…, own=…, session_started=…)  # first joiner?
    ring.started(notification_event_id, note, now_ms, rung=frozenset(...))
    ring.on_memberships(memberships) -> RingState | None   # ANSWERED when someone joined
    ring.on_decline(sender, content) -> RingState | None   # DECLINED when all declined
    ring.on_time(now_ms) -> RingState | None               # EXPIRED
    ring.state, ring.deadline_ms, ring.notification_event_id

**Incoming** (:func:`judge_notification`): js-sdk 43's receiving rules for a notification
(``parseCallNotificationContent``), with the room facts passed in. Returns the parsed
notification if it rings the receiver, else the reason it does not.

Nothing here performs I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import structlog

from matrixrtc.model._json import as_int, as_str, get_dict
from matrixrtc.model.membership import CallMembership
from matrixrtc.model.msc4354 import STICKY_FIELD
from matrixrtc.model.notification import RtcDecline, RtcNotification
from matrixrtc.model.slot import SlotStatus

__all__ = ["NotificationVerdict", "OutgoingRing", "RingState", "judge_notification"]

_log = structlog.get_logger(__name__)


class RingState(StrEnum):
    IDLE = "idle"  # not asked to ring, or the call already had members
    RINGING = "ringing"
    DECLINED = "declined"  # every rung user declined
    EXPIRED = "expired"  # the lifetime passed with nobody joining
    ANSWERED = "answered"  # someone joined while it rang


class OutgoingRing:
    """Our own ring, from sending to its end (see the module docstring)."""

    def __init__(self, own_user_id: str) -> None:
        self.own_user_id = own_user_id
        self.state = RingState.IDLE
        self.sent = False  # a ring was (or is being) sent; we ring at most once per call
        self.notification_event_id: str | None = None
        self.deadline_ms: int | None = None
        self.rung: frozenset[str] = frozenset()
        self.declined: set[str] = set()

    def should_ring(
        self,
        *,
        enabled: bool,
        memberships: tuple[CallMembership, ...],
        own: CallMembership | None,
        session_started: bool,
    ) -> bool:
        """js-sdk: only the member whose own membership started the call rings, once."""
        if not enabled or self.sent or own is None:
            return False
        if session_started and memberships == (own,):
            self.sent = True
            return True
        return False

    def started(
        self,
        notification_event_id: str,
        note: RtcNotification,
        now_ms: int,
        rung: Iterable[str],
    ) -> None:
        self.notification_event_id = notification_event_id
        self.state = RingState.RINGING
        self.deadline_ms = note.sender_ts + note.effective_lifetime_ms
        self.rung = frozenset(rung) - {self.own_user_id}
        self.declined.clear()
        _log.info("ring.started", rung=len(self.rung), lifetime_ms=note.effective_lifetime_ms)

    def on_memberships(self, memberships: Iterable[CallMembership]) -> RingState | None:
        if self.state is not RingState.RINGING:
            return None
        if any(m.sender != self.own_user_id for m in memberships):
            return self._end(RingState.ANSWERED)
        return None

    def on_decline(self, sender: object, content: object) -> RingState | None:
        """A ``org.matrix.msc4310.rtc.decline`` event from ``sender``."""
        if self.state is not RingState.RINGING or sender == self.own_user_id:
            return None
        decline = RtcDecline.from_json(content)
        if decline is None or decline.notification_event_id != self.notification_event_id:
            return None
        if isinstance(sender, str):
            self.declined.add(sender)
        _log.info("ring.declined", by=sender)
        if self.rung <= self.declined:
            return self._end(RingState.DECLINED)
        return None

    def on_time(self, now_ms: int) -> RingState | None:
        due = self.deadline_ms
        if self.state is RingState.RINGING and due is not None and now_ms >= due:
            return self._end(RingState.EXPIRED)
        return None

    def cancel(self) -> RingState | None:
        """We left: a ring still going ends as IDLE."""
        return self._end(RingState.IDLE) if self.state is RingState.RINGING else None

    def _end(self, state: RingState) -> RingState:
        self.state = state
        self.deadline_ms = None
        _log.info("ring.ended", state=state.value)
        return state


@dataclass(frozen=True, slots=True)
class NotificationVerdict:
    notification: RtcNotification | None  # set when it rings the receiver
    reason: str | None = None  # why it does not


def judge_notification(
    event: Mapping[str, object],
    *,
    receiver: str,
    now_ms: int,
    slot_status: SlotStatus,
    sender_may_notify_room: bool,
    current_sticky_event_id: str | None = None,
    receiver_in_slot: bool = False,
    receiver_left_at_ms: int | None = None,
    receiver_declined: bool = False,
    slot_of_referenced_membership: str | None = None,
) -> NotificationVerdict:
    """js-sdk 43's MSC4075 receiving rules, with the room facts as arguments.

    ``current_sticky_event_id``: when the event arrived sticky, the current sticky event of
    its sender for its slot (None: not sticky). ``receiver_left_at_ms``: when the receiver's
    latest leave of the slot was sent, if any. ``slot_of_referenced_membership``: for older
    notifications without ``slot_id``, the slot of the state membership they reference.
    ``slot_status`` is the status of the notification's slot.
    """

    def no(reason: str) -> NotificationVerdict:
        return NotificationVerdict(None, reason)

    note = RtcNotification.from_json(event.get("content"))
    if note is None:
        return no("malformed notification content")
    slot_id = note.slot_id or slot_of_referenced_membership
    if slot_id is None:
        return no("no slot_id and the referenced membership is not current")
    sender = as_str(event.get("sender"))
    event_id = as_str(event.get("event_id"))
    origin = as_int(event.get("origin_server_ts"))
    if sender is None or event_id is None or origin is None:
        return no("event without sender, event_id or origin_server_ts")
    if sender == receiver:
        return no("sent by the receiving user")
    if get_dict(event.get(STICKY_FIELD)) is not None and current_sticky_event_id != event_id:
        return no("not the current sticky event for its sender and slot")
    if slot_status is not SlotStatus.OPEN:
        return no(f"slot {slot_id} does not exist or is closed")
    if now_ms >= note.expires_at(origin, now_ms):
        return no("expired")
    mentions_user = receiver in note.mention_user_ids
    mentions_room = note.mention_room and sender_may_notify_room
    if not mentions_user and not mentions_room:
        return no("does not mention the receiving user")
    if receiver_left_at_ms is not None and receiver_left_at_ms >= origin:
        return no("the receiving user left the slot after it was sent")
    if receiver_in_slot:
        return no("the receiving user is already in the call")
    if receiver_declined:
        return no("the receiving user declined it")
    return NotificationVerdict(note)
