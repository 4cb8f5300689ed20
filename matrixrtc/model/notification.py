"""Call notification (MSC4075) and decline (MSC4310) content (spec/matrixrtc.md §5).

Public API::

    RtcNotification.ring(membership_event_id=…, sender_ts=…, intent=…) -> RtcNotification
    RtcNotification.from_json(content) -> RtcNotification | None   # js-sdk receive checks
    RtcNotification.to_json() -> dict
    RtcNotification.effective_lifetime_ms   # lifetime capped at 90 s, as receivers do
    RtcDecline.for_notification(event_id) / RtcDecline.from_json(content) / .to_json()

Who sends a notification (the first joiner only) is the agent's decision, not this module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from matrixrtc.model._json import (
    JsonDict,
    JsonValue,
    Reject,
    as_int,
    as_str,
    get_dict,
    parse_or_none,
)

__all__ = [
    "DEFAULT_LIFETIME_MS",
    "MAX_LIFETIME_MS",
    "NotificationType",
    "RtcDecline",
    "RtcNotification",
    "notification_type",
]

# Element Call's ring lifetime; receivers cap any lifetime at 90 s (parseCallNotificationContent).
DEFAULT_LIFETIME_MS: Final = 30_000
MAX_LIFETIME_MS: Final = 90_000


class NotificationType(StrEnum):
    RING = "ring"
    NOTIFICATION = "notification"


def notification_type(value: str) -> NotificationType | str:
    try:
        return NotificationType(value)
    except ValueError:
        return value


def _relates_to(content: dict[str, JsonValue], *, required: bool) -> str | None:
    raw = content.get("m.relates_to")
    if raw is None:
        if required:
            raise Reject("m.relates_to missing")
        return None
    rel = get_dict(raw)
    if rel is None or rel.get("rel_type") != "m.reference":
        raise Reject("m.relates_to is not an m.reference")
    event_id = as_str(rel.get("event_id"))
    if event_id is None:
        raise Reject("m.relates_to.event_id is not a string")
    return event_id


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcNotification:
    """``org.matrix.msc4075.rtc.notification`` content."""

    notification_type: NotificationType | str  # "notification_type"
    sender_ts: int  # "sender_ts"
    lifetime: int  # "lifetime", ms
    mention_user_ids: tuple[str, ...] = ()  # "m.mentions".user_ids
    mention_room: bool = True  # "m.mentions".room
    relates_to: str | None = None  # "m.relates_to".event_id: the sender's membership event
    intent: str | None = None  # "m.call.intent"

    @classmethod
    def ring(
        cls,
        *,
        membership_event_id: str,
        sender_ts: int,
        intent: str | None = None,
        notification_type: NotificationType = NotificationType.RING,
        lifetime: int = DEFAULT_LIFETIME_MS,
        mention_user_ids: Sequence[str] = (),
    ) -> RtcNotification:
        """What js-sdk ``sendCallNotify`` sends (room mention, reference to our membership)."""
        return cls(
            notification_type=notification_type,
            sender_ts=sender_ts,
            lifetime=lifetime,
            mention_user_ids=tuple(mention_user_ids),
            mention_room=True,
            relates_to=membership_event_id,
            intent=intent,
        )

    @property
    def effective_lifetime_ms(self) -> int:
        return max(0, min(self.lifetime, MAX_LIFETIME_MS))

    def to_json(self) -> JsonDict:
        out: JsonDict = {
            "m.mentions": {"user_ids": list(self.mention_user_ids), "room": self.mention_room},
            "notification_type": str(self.notification_type),
        }
        if self.relates_to is not None:
            out["m.relates_to"] = {"event_id": self.relates_to, "rel_type": "m.reference"}
        out["sender_ts"] = self.sender_ts
        out["lifetime"] = self.lifetime
        if self.intent is not None:
            out["m.call.intent"] = self.intent
        return out

    @classmethod
    def from_json(cls, content: object) -> RtcNotification | None:
        return parse_or_none("rtc.notification", lambda: _parse_notification(content))


def _parse_notification(content: object) -> RtcNotification:
    d = get_dict(content)
    if d is None:
        raise Reject("content is not an object")
    ntype = as_str(d.get("notification_type"))
    if ntype is None:
        raise Reject("notification_type is not a string")
    sender_ts = as_int(d.get("sender_ts"))
    if sender_ts is None:
        raise Reject("sender_ts is not an integer")
    lifetime = as_int(d.get("lifetime"))
    if lifetime is None:
        raise Reject("lifetime is not an integer")
    user_ids: tuple[str, ...] = ()
    room = False
    mentions = d.get("m.mentions")
    if mentions is not None:
        m = get_dict(mentions)
        if m is None:
            raise Reject("m.mentions is not an object")
        ids = m.get("user_ids", [])
        if not isinstance(ids, list) or not all(isinstance(u, str) for u in ids):
            raise Reject("m.mentions.user_ids is not an array of strings")
        user_ids = tuple(u for u in ids if isinstance(u, str))
        room = m.get("room") is True
    intent = d.get("m.call.intent")
    if intent is not None and not isinstance(intent, str):
        raise Reject("m.call.intent is not a string")
    return RtcNotification(
        notification_type=notification_type(ntype),
        sender_ts=sender_ts,
        lifetime=lifetime,
        mention_user_ids=user_ids,
        mention_room=room,
        relates_to=_relates_to(d, required=False),
        intent=intent,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcDecline:
    """``org.matrix.msc4310.rtc.decline`` content: a reference to the notification event."""

    notification_event_id: str  # "m.relates_to".event_id

    @classmethod
    def for_notification(cls, event_id: str) -> RtcDecline:
        return cls(notification_event_id=event_id)

    def to_json(self) -> JsonDict:
        return {"m.relates_to": {"rel_type": "m.reference", "event_id": self.notification_event_id}}

    @classmethod
    def from_json(cls, content: object) -> RtcDecline | None:
        def parse() -> RtcDecline:
            d = get_dict(content)
            if d is None:
                raise Reject("content is not an object")
            event_id = _relates_to(d, required=True)
            assert event_id is not None
            return cls(notification_event_id=event_id)

        return parse_or_none("rtc.decline", parse)
