"""Slots in the session, the outgoing ring machine and js-sdk 43's notification receiving rules."""

from __future__ import annotations

from typing import Any

from matrixrtc.model import RtcDecline, RtcNotification
from matrixrtc.model.slot import SlotStatus
from matrixrtc.session.ring import OutgoingRing, RingState, judge_notification
from tests.unit.test_session_rtc import ALICE, BOB, CAROL, NOW, session, state_ev, sticky_ev


def slot_ev(content: dict[str, Any] | None, key: str = "m.call#ROOM") -> dict[str, Any]:
    return {
        "type": "org.matrix.msc4143.rtc.slot",
        "state_key": key,
        "sender": ALICE,
        "event_id": "$slot",
        "origin_server_ts": NOW,
        "content": content or {},
    }


def slot_of(s: Any) -> SlotStatus:
    """(Read through a function: mypy narrows properties across calls that change them.)"""
    status: SlotStatus = s.slot_status
    return status


def state_of(ring: OutgoingRing) -> tuple[RingState, int | None]:
    return ring.state, ring.deadline_ms


OPEN = {"status": "open", "application": {"type": "m.call"}}
CLOSED = {"status": "closed", "application": {"type": "m.call"}}


def test_a_closed_slot_hides_sticky_members_but_not_state_members() -> None:
    s = session()
    s.receive_room_update(
        state=[state_ev(ALICE, "A1")], sticky=[sticky_ev(BOB, "B1", "uuid-b")], now_ms=NOW
    )
    s.update(NOW)
    assert {m.sender for m in s.memberships} == {ALICE, BOB}
    assert s.slot_status is SlotStatus.UNKNOWN
    s.receive_room_update(state=[slot_ev(CLOSED)], now_ms=NOW)
    changes = s.update(NOW)
    assert slot_of(s) is SlotStatus.CLOSED
    assert changes is not None
    assert {m.sender for m in s.memberships} == {ALICE}
    s.receive_room_update(state=[slot_ev(OPEN)], now_ms=NOW)
    s.update(NOW)
    assert {m.sender for m in s.memberships} == {ALICE, BOB}


def test_only_our_slot_id_counts() -> None:
    s = session()
    s.receive_room_update(state=[slot_ev(CLOSED, key="m.call#other")], now_ms=NOW)
    assert s.slot_status is SlotStatus.UNKNOWN


def test_outgoing_ring_ends_declined_only_when_every_rung_user_declined() -> None:
    ring = OutgoingRing(ALICE)
    note = RtcNotification.ring(membership_event_id="$m", sender_ts=NOW, lifetime=30_000)
    ring.started("$n", note, NOW, {ALICE, BOB, CAROL})
    assert ring.state is RingState.RINGING
    assert ring.deadline_ms == NOW + 30_000
    decline = RtcDecline.for_notification("$n").to_json()
    assert ring.on_decline(BOB, RtcDecline.for_notification("$other").to_json()) is None
    assert ring.on_decline(ALICE, decline) is None  # our own decline does not count
    assert ring.on_decline(BOB, decline) is None
    assert ring.on_decline(CAROL, decline) is RingState.DECLINED
    assert state_of(ring) == (RingState.DECLINED, None)


def test_outgoing_ring_expires_and_is_answered() -> None:
    ring = OutgoingRing(ALICE)
    note = RtcNotification.ring(membership_event_id="$m", sender_ts=NOW, lifetime=1_000)
    ring.started("$n", note, NOW, {BOB})
    assert ring.on_time(NOW + 999) is None
    assert ring.on_time(NOW + 1_000) is RingState.EXPIRED
    ring2 = OutgoingRing(ALICE)
    ring2.started("$n", note, NOW, {BOB})
    s = session()
    s.receive_room_update(state=[state_ev(BOB, "B1")], now_ms=NOW)
    s.update(NOW)
    assert ring2.on_memberships(s.memberships) is RingState.ANSWERED


def test_only_the_first_joiner_rings_once() -> None:
    s = session()
    s.receive_room_update(state=[state_ev(ALICE, "A1")], now_ms=NOW)
    changes = s.update(NOW)
    assert changes is not None
    own = s.memberships[0]
    ring = OutgoingRing(ALICE)
    kw = {"memberships": changes.memberships, "own": own, "session_started": True}
    assert not ring.should_ring(enabled=False, **kw)  # type: ignore[arg-type]
    assert ring.should_ring(enabled=True, **kw)  # type: ignore[arg-type]
    assert not ring.should_ring(enabled=True, **kw)  # type: ignore[arg-type]


def notification_ev(**over: Any) -> dict[str, Any]:
    content = RtcNotification.ring(membership_event_id="$m", sender_ts=NOW).to_json()
    content.update(over.pop("content", {}))
    ev = {
        "type": "org.matrix.msc4075.rtc.notification",
        "sender": ALICE,
        "event_id": "$n",
        "origin_server_ts": NOW,
        "content": content,
        "msc4354_sticky": {"duration_ms": 50_000},
    }
    ev.update(over)
    return ev


def judge(ev: dict[str, Any], **facts: Any) -> str | None:
    kw: dict[str, Any] = {
        "receiver": BOB,
        "now_ms": NOW + 1_000,
        "slot_status": SlotStatus.OPEN,
        "sender_may_notify_room": True,
        "current_sticky_event_id": "$n",
    }
    kw.update(facts)
    return judge_notification(ev, **kw).reason


def test_receiving_rules_of_js_sdk_43() -> None:
    assert judge(notification_ev()) is None  # rings
    assert judge(notification_ev(sender=BOB)) == "sent by the receiving user"
    assert judge(notification_ev(), current_sticky_event_id="$newer") is not None
    assert judge(notification_ev(), slot_status=SlotStatus.UNKNOWN) is not None
    assert judge(notification_ev(), slot_status=SlotStatus.CLOSED) is not None
    assert judge(notification_ev(), now_ms=NOW + 30_000) == "expired"
    assert judge(notification_ev(), sender_may_notify_room=False) is not None
    direct = notification_ev(content={"m.mentions": {"user_ids": [BOB], "room": False}})
    assert judge(direct, sender_may_notify_room=False) is None
    assert judge(notification_ev(), receiver_in_slot=True) is not None
    assert judge(notification_ev(), receiver_left_at_ms=NOW + 1) is not None
    assert judge(notification_ev(), receiver_left_at_ms=NOW - 1) is None
    assert judge(notification_ev(), receiver_declined=True) is not None
    # A plain (not sticky) notification has no sticky entry to be current in.
    plain = notification_ev()
    del plain["msc4354_sticky"]
    assert judge(plain, current_sticky_event_id=None) is None
