"""Ring notification (MSC4075) and decline (MSC4310) content, and the EventType registry."""

from __future__ import annotations

from typing import Any

import pytest

from matrixrtc.model import EventType, NotificationType, RtcDecline, RtcNotification, event_type

# The notification of spec §5.1, verbatim.
SPEC_NOTIFICATION: dict[str, Any] = {
    "m.mentions": {"user_ids": [], "room": True},
    "notification_type": "ring",
    "m.relates_to": {"event_id": "$own_membership_event", "rel_type": "m.reference"},
    "sender_ts": 1753000000000,
    "lifetime": 30000,
    "m.call.intent": "video",
}


def test_ring_is_exactly_what_js_sdk_sends() -> None:
    n = RtcNotification.ring(
        membership_event_id="$own_membership_event", sender_ts=1753000000000, intent="video"
    )
    assert n.to_json() == SPEC_NOTIFICATION
    assert RtcNotification.from_json(SPEC_NOTIFICATION) == n
    assert n.notification_type is NotificationType.RING


def test_notification_type_notification_and_unknown() -> None:
    n = RtcNotification.ring(
        membership_event_id="$m",
        sender_ts=1,
        notification_type=NotificationType.NOTIFICATION,
    )
    assert n.to_json()["notification_type"] == "notification"
    odd = RtcNotification.from_json({**SPEC_NOTIFICATION, "notification_type": "buzz"})
    assert odd is not None
    assert odd.notification_type == "buzz"  # kept, not rejected: receivers decide


def test_lifetime_is_capped_at_90s_for_receivers() -> None:
    n = RtcNotification.from_json({**SPEC_NOTIFICATION, "lifetime": 600_000})
    assert n is not None
    assert n.lifetime == 600_000  # the wire value is kept
    assert n.effective_lifetime_ms == 90_000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("notification_type", None),
        ("notification_type", 1),
        ("sender_ts", None),
        ("sender_ts", "1753000000000"),
        ("lifetime", None),
        ("lifetime", True),
        ("m.relates_to", {"event_id": "$x", "rel_type": "m.annotation"}),
        ("m.mentions", []),
        ("m.call.intent", 3),
    ],
)
def test_notification_receive_checks(field: str, value: Any) -> None:
    content = dict(SPEC_NOTIFICATION)
    if value is None:
        del content[field]
    else:
        content[field] = value
    assert RtcNotification.from_json(content) is None


def test_decline_shape() -> None:
    d = RtcDecline.for_notification("$notif")
    assert d.to_json() == {"m.relates_to": {"rel_type": "m.reference", "event_id": "$notif"}}
    assert RtcDecline.from_json(d.to_json()) == d
    assert RtcDecline.from_json({}) is None
    assert RtcDecline.from_json({"m.relates_to": {"rel_type": "m.reference"}}) is None
    assert (
        RtcDecline.from_json({"m.relates_to": {"rel_type": "m.thread", "event_id": "$n"}}) is None
    )


def test_event_type_registry() -> None:
    wire = {m.name: m.value for m in EventType}
    assert wire["CALL_MEMBER"] == "org.matrix.msc3401.call.member"
    assert wire["RTC_MEMBER"] == "org.matrix.msc4143.rtc.member"
    assert wire["RTC_NOTIFICATION"] == "org.matrix.msc4075.rtc.notification"
    assert wire["RTC_DECLINE"] == "org.matrix.msc4310.rtc.decline"
    assert str(EventType.CALL_MEMBER) == "org.matrix.msc3401.call.member"
    assert event_type("org.matrix.msc4310.rtc.decline") is EventType.RTC_DECLINE
    assert event_type("com.example.unknown") is None
    assert event_type(None) is None
