"""Media-key to-device messages (pure): parse, validate, serialise.

Two dialects (spec/matrixrtc.md §4.2–4.3):

* ``io.element.call.encryption_keys`` — what matrix-js-sdk / Element Call send and read::

    {"keys": {"index": 0, "key": "<16 bytes, std base64, padded>"}, "room_id": "!r:hs",
     "member": {"claimed_device_id": "DEV", "id": "<sender memberId>"},
     "session": {"call_id": "", "application": "m.call", "scope": "m.room"}, "sent_ts": 1753…}

  We write this one. Receive checks are js-sdk's (room, ``keys.key``, numeric ``keys.index``,
  ``member.claimed_device_id``; ``session`` is not checked) plus an index range of 0..255 and a
  bounded, decodable key.
* ``m.rtc.encryption_key`` (MSC4143 draft; unstable ``org.matrix.msc4143.rtc.encryption_key``)
  — read only: ``{"room_id", "slot_id"?, "member_id" | "member.id" | "member": {"id"},
  "media_key": {"index", "key", "format"?}}``. The draft writes the member field as
  ``member.id`` in a JSON5 example whose prose says ``member.id``; all three spellings are read.

Whether the message arrived Olm-encrypted and from which device is the transport's business
(the parsed ``claimed_device_id`` is only a claim). Parsers never raise: they log and return None.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Final

import structlog

__all__ = [
    "DRAFT_KEY_TYPES",
    "ELEMENT_CALL_KEYS_TYPE",
    "ElementCallKeys",
    "ReceivedKey",
    "decode_key",
    "encode_key",
    "parse_key_message",
]

log = structlog.get_logger(__name__)

ELEMENT_CALL_KEYS_TYPE: Final = "io.element.call.encryption_keys"
DRAFT_KEY_TYPES: Final = frozenset(
    {"m.rtc.encryption_key", "org.matrix.msc4143.rtc.encryption_key"}
)
MAX_KEY_BYTES: Final = 64  # Element Call sends 16, the draft 32; anything longer is junk
_MAX_SAFE_INT = 2**53 - 1


class _Reject(Exception):
    pass


def encode_key(key: bytes) -> str:
    """Standard, padded base64: what matrix-js-sdk's ``encodeBase64`` produces."""
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes | None:
    """Decode padded or unpadded, standard or URL-safe base64 (js-sdk decodes loosely)."""
    s = text.strip().replace("-", "+").replace("_", "/").rstrip("=")
    if not s or len(s) % 4 == 1:
        return None
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _str(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Reject(f"{what} is not a non-empty string")
    return value


def _dict(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Reject(f"{what} is not an object")
    return value


def _opt_str(d: dict[str, object], name: str, default: str) -> str:
    value = d.get(name)
    return value if isinstance(value, str) else default


def _index(value: object) -> int:
    # js-sdk only checks typeof === "number"; a key ring has 256 slots, so 0..255.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Reject("key index is not a number")
    if isinstance(value, float) and not value.is_integer():
        raise _Reject("key index is not an integer")
    if not 0 <= int(value) <= 255:
        raise _Reject("key index outside 0..255")
    return int(value)


def _key(value: object) -> bytes:
    key = decode_key(_str(value, "key"))
    if key is None:
        raise _Reject("key is not base64")
    if len(key) > MAX_KEY_BYTES:
        raise _Reject("key longer than 64 bytes")
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class ElementCallKeys:
    """``io.element.call.encryption_keys`` content (JSON names in the comments)."""

    room_id: str  # "room_id"
    index: int  # "keys"."index"
    key: bytes = field(repr=False)  # "keys"."key", std base64 padded
    claimed_device_id: str  # "member"."claimed_device_id"
    member_id: str | None = None  # "member"."id"
    sent_ts: int | None = None  # "sent_ts" (statistics only)
    call_id: str = ""  # "session"."call_id"
    application: str = "m.call"  # "session"."application"
    scope: str = "m.room"  # "session"."scope"

    def to_json(self) -> dict[str, object]:
        member: dict[str, object] = {"claimed_device_id": self.claimed_device_id}
        if self.member_id is not None:
            member["id"] = self.member_id
        content: dict[str, object] = {
            "keys": {"index": self.index, "key": encode_key(self.key)},
            "room_id": self.room_id,
            "member": member,
            "session": {
                "call_id": self.call_id,
                "application": self.application,
                "scope": self.scope,
            },
        }
        if self.sent_ts is not None:
            content["sent_ts"] = self.sent_ts
        return content

    @classmethod
    def from_json(cls, content: object, *, room_id: str | None = None) -> ElementCallKeys | None:
        """Parse with js-sdk's receive checks; ``room_id`` = the session room (if known)."""
        try:
            c = _dict(content, "content")
            rid = _str(c.get("room_id"), "room_id")
            if room_id is not None and rid != room_id:
                raise _Reject("room_id is not the session's room")
            keys = _dict(c.get("keys"), "keys")
            member = _dict(c.get("member"), "member")
            mid = member.get("id")
            session = c.get("session")
            s = session if isinstance(session, dict) else {}
            sent_ts = c.get("sent_ts")
            return cls(
                room_id=rid,
                index=_index(keys.get("index")),
                key=_key(keys.get("key")),
                claimed_device_id=_str(member.get("claimed_device_id"), "member.claimed_device_id"),
                member_id=mid if isinstance(mid, str) and mid else None,
                sent_ts=sent_ts
                if isinstance(sent_ts, int)
                and not isinstance(sent_ts, bool)
                and 0 <= sent_ts <= _MAX_SAFE_INT
                else None,
                # session is not checked on receive (js-sdk); keep what is there.
                call_id=_opt_str(s, "call_id", ""),
                application=_opt_str(s, "application", "m.call"),
                scope=_opt_str(s, "scope", "m.room"),
            )
        except _Reject as e:
            log.info("e2ee.key_message_rejected", type=ELEMENT_CALL_KEYS_TYPE, reason=str(e))
        except Exception as e:  # a parser bug must still only drop the message
            log.warning("e2ee.key_message_parser_error", error=repr(e))
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedKey:
    """A media key from either dialect, ready for :meth:`KeyManager.receive_key`."""

    room_id: str
    index: int
    key: bytes = field(repr=False)
    member_id: str | None
    claimed_device_id: str | None  # the draft carries none: use the Olm sender device
    dialect: str  # the event type it came in

    def member_id_for(self, sender: str, device_id: str) -> str:
        """js-sdk's fallback when ``member.id`` is absent: ``"<sender>:<device>"``."""
        return self.member_id if self.member_id is not None else f"{sender}:{device_id}"


def _draft(content: object, room_id: str | None, event_type: str) -> ReceivedKey:
    c = _dict(content, "content")
    rid = _str(c.get("room_id"), "room_id")
    if room_id is not None and rid != room_id:
        raise _Reject("room_id is not the session's room")
    media = _dict(c.get("media_key"), "media_key")
    fmt = media.get("format", 0)
    if fmt != 0 or isinstance(fmt, bool):
        raise _Reject("media_key.format is not 0 (raw key bytes)")
    member = c.get("member")
    mid = c.get("member_id", c.get("member.id"))
    if mid is None and isinstance(member, dict):
        mid = member.get("id")
    return ReceivedKey(
        room_id=rid,
        index=_index(media.get("index")),
        key=_key(media.get("key")),
        member_id=_str(mid, "member id"),
        claimed_device_id=None,
        dialect=event_type,
    )


def parse_key_message(
    event_type: str, content: object, *, room_id: str | None = None
) -> ReceivedKey | None:
    """Parse a to-device key message of either dialect; None (logged) when invalid."""
    if event_type == ELEMENT_CALL_KEYS_TYPE:
        ec = ElementCallKeys.from_json(content, room_id=room_id)
        if ec is None:
            return None
        return ReceivedKey(
            room_id=ec.room_id,
            index=ec.index,
            key=ec.key,
            member_id=ec.member_id,
            claimed_device_id=ec.claimed_device_id,
            dialect=event_type,
        )
    if event_type in DRAFT_KEY_TYPES:
        try:
            return _draft(content, room_id, event_type)
        except _Reject as e:
            log.info("e2ee.key_message_rejected", type=event_type, reason=str(e))
        except Exception as e:  # a parser bug must still only drop the message
            log.warning("e2ee.key_message_parser_error", error=repr(e))
        return None
    log.debug("e2ee.not_a_key_message", type=event_type)
    return None
