"""Call notification (MSC4075) and decline (MSC4310) content, as matrix-js-sdk 43 has them.

js-sdk 43 (``MatrixRTCSession.sendCallNotify``, ``types.parseCallNotificationContent``,
``MatrixClient.sendRtcDecline``; newer than spec/matrixrtc.md §5, see its §1.2 erratum):

* a notification names its slot (``slot_id``) and is a sticky event (MSC4354) keyed by that
  slot (``msc4354_sticky_key`` = slot id), sticky for ``lifetime + 20 s``; a plain event
  where the homeserver has no sticky events;
* ``lifetime`` is capped at 2 minutes, measured from ``sender_ts`` unless ``sender_ts`` is
  more than 20 s ahead of ``origin_server_ts`` (then from ``origin_server_ts``);
* a decline references the notification and is sticky, keyed by the notification's event id.

Public API::

    RtcNotification.ring(membership_event_id=…, sender_ts=…, intent=…) -> RtcNotification
    RtcNotification.from_json(content) -> RtcNotification | None   # js-sdk's schema checks
    RtcNotification.to_json() -> dict
    RtcNotification.expires_at(origin_server_ts, now_ms)           # js getCallNotificationExpiry
    RtcNotification.sticky_duration_ms                             # lifetime + 20 s
    RtcDecline.for_notification(event_id) / RtcDecline.from_json(content) / .to_json()

Who sends a notification (the first joiner only) and whether a received one rings (the
receiving rules) live in :mod:`matrixrtc.session.ring`.
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
    as_str,
    get_dict,
    parse_or_none,
)
from matrixrtc.model.livekit_ids import DEFAULT_SLOT_ID
from matrixrtc.model.msc4354 import STICKY_KEY_FIELD

__all__ = [
    "DECLINE_STICKY_MS",
    "DEFAULT_LIFETIME_MS",
    "MAX_LIFETIME_MS",
    "MAX_SENDER_TS_AHEAD_MS",
    "NotificationType",
    "RtcDecline",
    "RtcNotification",
    "notification_type",
]

# Element Call's ring lifetime; js-sdk's own default is 90 s.
DEFAULT_LIFETIME_MS: Final = 30_000
# js-sdk 43 RTC_NOTIFICATION_MAX_LIFETIME_MS: receivers cap any lifetime at 2 minutes.
MAX_LIFETIME_MS: Final = 120_000
# js-sdk 43 RTC_NOTIFICATION_MAX_SENDER_TS_AHEAD_MS.
MAX_SENDER_TS_AHEAD_MS: Final = 20_000
# js-sdk sendRtcDecline: a decline stays sticky as long as a notification can live.
DECLINE_STICKY_MS: Final = MAX_LIFETIME_MS


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
            raise Reject("m.relates_to missing", field="m.relates_to")
        return None
    rel = get_dict(raw)
    if rel is None or rel.get("rel_type") != "m.reference":
        raise Reject("m.relates_to is not an m.reference", field="m.relates_to")
    event_id = as_str(rel.get("event_id"))
    if event_id is None:
        raise Reject("m.relates_to.event_id is not a string", field="m.relates_to.event_id")
    return event_id


def _non_negative_integer(d: dict[str, JsonValue], key: str) -> int:
    """JavaScript ``Number.isInteger(v) && v >= 0`` (an integral float counts)."""
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Reject(f"missing or invalid {key}", field=key)
    if isinstance(value, float) and not value.is_integer():
        raise Reject(f"missing or invalid {key}", field=key)
    if value < 0:
        raise Reject(f"missing or invalid {key}", field=key)
    return int(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcNotification:
    """``org.matrix.msc4075.rtc.notification`` content."""

    notification_type: NotificationType | str  # "notification_type"
    sender_ts: int  # "sender_ts"
    lifetime: int  # "lifetime", ms
    slot_id: str | None = DEFAULT_SLOT_ID  # "slot_id"; None: older senders (see relates_to)
    mention_user_ids: tuple[str, ...] = ()  # "m.mentions".user_ids
    mention_room: bool = True  # "m.mentions".room
    relates_to: str | None = None  # "m.relates_to".event_id: the sender's membership event
    intent: str | None = None  # "m.call.intent"
    sticky_key: str | None = None  # "msc4354_sticky_key" (== slot_id when present)

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
        slot_id: str = DEFAULT_SLOT_ID,
    ) -> RtcNotification:
        """What js-sdk 43 ``sendCallNotify`` sends (room mention, reference to our
        membership, the slot, the slot as sticky key)."""
        return cls(
            notification_type=notification_type,
            sender_ts=sender_ts,
            lifetime=lifetime,
            slot_id=slot_id,
            mention_user_ids=tuple(mention_user_ids),
            mention_room=True,
            relates_to=membership_event_id,
            intent=intent,
            sticky_key=slot_id,
        )

    @property
    def effective_lifetime_ms(self) -> int:
        return max(0, min(self.lifetime, MAX_LIFETIME_MS))

    @property
    def sticky_duration_ms(self) -> int:
        """How long js-sdk keeps it sticky: the server counts from ``origin_server_ts``,
        receivers from ``sender_ts``, which may be up to 20 s later."""
        return self.effective_lifetime_ms + MAX_SENDER_TS_AHEAD_MS

    def expires_at(self, origin_server_ts: int, now_ms: int) -> int:
        """js-sdk ``getCallNotificationExpiry``."""
        ahead = self.sender_ts - origin_server_ts > MAX_SENDER_TS_AHEAD_MS
        basis = origin_server_ts if ahead else self.sender_ts
        return min(basis + self.effective_lifetime_ms, now_ms + MAX_LIFETIME_MS)

    def to_json(self) -> JsonDict:
        # Field order as js-sdk 43 writes it.
        out: JsonDict = {}
        if self.slot_id is not None:
            out["slot_id"] = self.slot_id
        out["m.mentions"] = {"user_ids": list(self.mention_user_ids), "room": self.mention_room}
        out["notification_type"] = str(self.notification_type)
        if self.relates_to is not None:
            out["m.relates_to"] = {"event_id": self.relates_to, "rel_type": "m.reference"}
        out["sender_ts"] = self.sender_ts
        out["lifetime"] = self.lifetime
        if self.sticky_key is not None:
            out[STICKY_KEY_FIELD] = self.sticky_key
        if self.intent is not None:
            out["m.call.intent"] = self.intent
        return out

    @classmethod
    def from_json(cls, content: object) -> RtcNotification | None:
        return parse_or_none("rtc.notification", lambda: _parse_notification(content))


def _parse_notification(content: object) -> RtcNotification:
    """js-sdk 43 ``parseCallNotificationContent``'s schema checks (the receiving rules are in
    :mod:`matrixrtc.session.ring`). ``slot_id`` may be absent when ``m.relates_to``
    references the sender's state membership (older senders); the caller resolves it."""
    d = get_dict(content)
    if d is None:
        raise Reject("content is not an object")
    if all(k == STICKY_KEY_FIELD for k in d):
        raise Reject("notification was withdrawn", field=STICKY_KEY_FIELD)
    slot_id: str | None = None
    if "slot_id" in d:
        slot_id = as_str(d["slot_id"])
        if slot_id is None or slot_id.count("#") > 1:
            raise Reject("invalid slot_id", field="slot_id")
    relates_to = _relates_to(d, required=False) if "m.relates_to" in d else None
    if slot_id is None and relates_to is None:
        raise Reject("no slot_id and no m.reference to derive it from", field="slot_id")
    sticky_key: str | None = None
    if STICKY_KEY_FIELD in d:
        sticky_key = as_str(d[STICKY_KEY_FIELD])
        if sticky_key is None or (slot_id is not None and sticky_key != slot_id):
            raise Reject("msc4354_sticky_key must be equal to slot_id", field=STICKY_KEY_FIELD)
    # js-sdk 43 does not check the type; a missing or odd one is kept as "" (rings nobody).
    ntype = as_str(d.get("notification_type")) or ""
    sender_ts = _non_negative_integer(d, "sender_ts")
    lifetime = _non_negative_integer(d, "lifetime")
    m = get_dict(d.get("m.mentions"))
    if m is None:
        raise Reject("missing or malformed m.mentions", field="m.mentions")
    room = m.get("room")
    if "room" in m and not isinstance(room, bool):
        raise Reject("malformed m.mentions.room", field="m.mentions.room")
    ids = m.get("user_ids", [])
    if "user_ids" in m and (not isinstance(ids, list) or not all(isinstance(u, str) for u in ids)):
        raise Reject("malformed m.mentions.user_ids", field="m.mentions.user_ids")
    user_ids = tuple(u for u in ids if isinstance(u, str)) if isinstance(ids, list) else ()
    if room is not True and not user_ids:
        raise Reject("m.mentions targets neither the room nor a user", field="m.mentions")
    intent = d.get("m.call.intent")
    return RtcNotification(
        notification_type=notification_type(ntype),
        sender_ts=sender_ts,
        lifetime=lifetime,
        slot_id=slot_id,
        mention_user_ids=user_ids,
        mention_room=room is True,
        relates_to=relates_to,
        intent=intent if isinstance(intent, str) else None,
        sticky_key=sticky_key,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcDecline:
    """``org.matrix.msc4310.rtc.decline`` content: a reference to the notification event,
    sticky (js-sdk 43) under the notification's event id."""

    notification_event_id: str  # "m.relates_to".event_id

    @classmethod
    def for_notification(cls, event_id: str) -> RtcDecline:
        return cls(notification_event_id=event_id)

    def to_json(self) -> JsonDict:
        return {
            "m.relates_to": {"event_id": self.notification_event_id, "rel_type": "m.reference"},
            STICKY_KEY_FIELD: self.notification_event_id,
        }

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
