"""Ring notification (MSC4075), decline (MSC4310) and slot content as js-sdk 43 has them."""

from __future__ import annotations

from typing import Any

import pytest

from matrixrtc.model import EventType, NotificationType, RtcDecline, RtcNotification, event_type
from matrixrtc.model.slot import SlotStatus, open_slot_content, slot_status

# What js-sdk 43's sendCallNotify sends, in its key order (MatrixRTCSession.js).
JS_NOTIFICATION: dict[str, Any] = {
    "slot_id": "m.call#ROOM",
    "m.mentions": {"user_ids": [], "room": True},
    "notification_type": "ring",
    "m.relates_to": {"event_id": "$own_membership_event", "rel_type": "m.reference"},
    "sender_ts": 1753000000000,
    "lifetime": 30000,
    "msc4354_sticky_key": "m.call#ROOM",
    "m.call.intent": "video",
}


def test_ring_is_exactly_what_js_sdk_sends() -> None:
    n = RtcNotification.ring(
        membership_event_id="$own_membership_event", sender_ts=1753000000000, intent="video"
    )
    assert n.to_json() == JS_NOTIFICATION
    assert list(n.to_json()) == list(JS_NOTIFICATION)
    assert RtcNotification.from_json(JS_NOTIFICATION) == n
    assert n.notification_type is NotificationType.RING
    assert n.sticky_duration_ms == 30_000 + 20_000  # lifetime + 20 s, as js-sdk


def test_notification_type_is_not_checked_by_js_sdk_43() -> None:
    odd = RtcNotification.from_json({**JS_NOTIFICATION, "notification_type": "buzz"})
    assert odd is not None
    assert odd.notification_type == "buzz"
    untyped = {k: v for k, v in JS_NOTIFICATION.items() if k != "notification_type"}
    assert RtcNotification.from_json(untyped) is not None


def test_lifetime_is_capped_at_two_minutes_and_measured_like_js_sdk() -> None:
    n = RtcNotification.from_json({**JS_NOTIFICATION, "lifetime": 600_000})
    assert n is not None
    assert n.lifetime == 600_000  # the wire value is kept
    assert n.effective_lifetime_ms == 120_000
    ts = 1753000000000
    ok = RtcNotification.ring(membership_event_id="$m", sender_ts=ts)
    # sender_ts within 20 s of origin_server_ts: measured from sender_ts
    assert ok.expires_at(ts - 5_000, ts) == ts + 30_000
    # sender_ts more than 20 s ahead: measured from origin_server_ts
    assert ok.expires_at(ts - 25_000, ts) == ts - 25_000 + 30_000
    # never more than 2 minutes from now
    assert ok.expires_at(ts, ts - 200_000) == ts - 200_000 + 120_000


def test_older_notification_without_slot_id_needs_a_reference() -> None:
    legacy = {k: v for k, v in JS_NOTIFICATION.items() if k not in ("slot_id",)}
    legacy.pop("msc4354_sticky_key")
    n = RtcNotification.from_json(legacy)
    assert n is not None
    assert n.slot_id is None
    assert n.relates_to == "$own_membership_event"
    del legacy["m.relates_to"]
    assert RtcNotification.from_json(legacy) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sender_ts", None),
        ("sender_ts", "1753000000000"),
        ("sender_ts", -1),
        ("sender_ts", 1.5),
        ("lifetime", None),
        ("lifetime", True),
        ("m.mentions", []),
        ("m.mentions", None),
        ("m.mentions", {"room": False, "user_ids": []}),
        ("m.mentions", {"room": "yes"}),
        ("m.mentions", {"user_ids": [1]}),
        ("slot_id", "m.call#ROOM#x"),
        ("slot_id", 3),
        ("msc4354_sticky_key", "other"),
    ],
)
def test_notification_receive_checks(field: str, value: Any) -> None:
    content = dict(JS_NOTIFICATION)
    if value is None:
        del content[field]
    else:
        content[field] = value
    assert RtcNotification.from_json(content) is None


def test_withdrawn_notification_is_rejected() -> None:
    assert RtcNotification.from_json({"msc4354_sticky_key": "m.call#ROOM"}) is None


def test_decline_shape_is_js_sdk_sendRtcDecline() -> None:
    d = RtcDecline.for_notification("$notif")
    assert d.to_json() == {
        "m.relates_to": {"event_id": "$notif", "rel_type": "m.reference"},
        "msc4354_sticky_key": "$notif",
    }
    assert RtcDecline.from_json(d.to_json()) == d
    assert RtcDecline.from_json({}) is None
    assert RtcDecline.from_json({"m.relates_to": {"rel_type": "m.reference"}}) is None
    assert (
        RtcDecline.from_json({"m.relates_to": {"rel_type": "m.thread", "event_id": "$n"}}) is None
    )


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (None, SlotStatus.UNKNOWN),
        ({"status": "open", "application": {"type": "m.call"}}, SlotStatus.OPEN),
        ({"status": "closed", "application": {"type": "m.call"}}, SlotStatus.CLOSED),
        ({"status": "open", "application": {"type": "other"}}, SlotStatus.CLOSED),
        ({"status": "open", "application": "m.call"}, SlotStatus.CLOSED),
        ({"status": "open"}, SlotStatus.CLOSED),
        ({}, SlotStatus.CLOSED),  # e.g. a redacted slot event
    ],
)
def test_slot_status_is_js_sdk_isSlotClosed(content: Any, status: SlotStatus) -> None:
    assert slot_status(content) is status


def test_open_slot_keeps_other_content_like_ensureRtcSlotOpen() -> None:
    existing = {"status": "closed", "application": {"type": "m.call"}, "x.custom": [1]}
    opened = open_slot_content(existing, encryption="org.matrix.msc4143.per_member")
    assert opened == {
        "status": "open",
        "application": {"type": "m.call"},
        "x.custom": [1],
        "encryption": {"type": "org.matrix.msc4143.per_member"},
    }
    assert open_slot_content(opened, encryption="org.matrix.msc4143.per_member") is None
    # No encryption asked: js-sdk writes `encryption: undefined`, i.e. drops it.
    plain = open_slot_content(opened)
    assert plain is not None
    assert "encryption" not in plain
    assert open_slot_content(None) == {"status": "open", "application": {"type": "m.call"}}


def test_event_type_registry() -> None:
    wire = {m.name: m.value for m in EventType}
    assert wire["CALL_MEMBER"] == "org.matrix.msc3401.call.member"
    assert wire["RTC_MEMBER"] == "org.matrix.msc4143.rtc.member"
    assert wire["RTC_SLOT"] == "org.matrix.msc4143.rtc.slot"
    assert wire["RTC_NOTIFICATION"] == "org.matrix.msc4075.rtc.notification"
    assert wire["RTC_DECLINE"] == "org.matrix.msc4310.rtc.decline"
    assert str(EventType.CALL_MEMBER) == "org.matrix.msc3401.call.member"
    assert event_type("org.matrix.msc4310.rtc.decline") is EventType.RTC_DECLINE
    assert event_type("com.example.unknown") is None
    assert event_type(None) is None
