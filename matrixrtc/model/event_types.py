"""Event type names used by MatrixRTC, as matrix-js-sdk / Element Call send them.

``EventType`` is a ``StrEnum`` so members compare equal to the wire strings
(``EventType.CALL_MEMBER == "org.matrix.msc3401.call.member"``). Unknown types stay plain
strings: use :func:`event_type` to map a wire string to a member or ``None``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["EventType", "event_type"]


class EventType(StrEnum):
    """Wire names; the comment on each says which MSC and which form."""

    # MSC3401/MSC4143 state form ("session membership"); Element Call's default.
    CALL_MEMBER = "org.matrix.msc3401.call.member"
    # MSC4143 sticky form (MSC4354 sticky events); Element Call's matrix_2_0 mode.
    RTC_MEMBER = "org.matrix.msc4143.rtc.member"
    # MSC4143 slot state (state key = slot id): open | closed (js-sdk 43).
    RTC_SLOT = "org.matrix.msc4143.rtc.slot"
    # MSC4075 call notification (ring / notification).
    RTC_NOTIFICATION = "org.matrix.msc4075.rtc.notification"
    # MSC4075 legacy notify: no longer sent by js-sdk, recognised only.
    CALL_NOTIFY_LEGACY = "org.matrix.msc4075.call.notify"
    # MSC4310 decline of a ring.
    RTC_DECLINE = "org.matrix.msc4310.rtc.decline"
    # Element Call's per-participant media keys (to-device, Olm-encrypted).
    ENCRYPTION_KEYS = "io.element.call.encryption_keys"
    ROOM_MEMBER = "m.room.member"
    ROOM_CREATE = "m.room.create"
    ROOM_ENCRYPTION = "m.room.encryption"
    ROOM_REDACTION = "m.room.redaction"


_BY_VALUE = {m.value: m for m in EventType}


def event_type(value: object) -> EventType | None:
    """The member for a wire string, or None for anything else (never raises)."""
    return _BY_VALUE.get(value) if isinstance(value, str) else None
