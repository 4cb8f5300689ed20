"""Which received key messages may reach the key manager (pure).

js-sdk hands every ``io.element.call.encryption_keys`` to-device message to its key manager
and takes the sender device from the content's ``member.claimed_device_id``; it cannot tell
plaintext from Olm delivery (spec/matrixrtc.md §4.2). Anyone who can send a to-device message
could then plant a media key for any device. We harden that (§4.2 [I]):

* a key message must arrive Olm-encrypted, and the device is the one whose Olm identity key
  decrypted it (the adapter's verified ``sender_device``), never the claim in the content;
* an Olm message whose ``claimed_device_id`` names another device is dropped: a sender that
  lies about its device is not trusted for its key either;
* plaintext key messages are dropped in encrypted rooms always, and elsewhere unless the
  caller opted in (``allow_plaintext``: test pages only), where the claim is all there is;
* messages for another room (another call on the same device) are not ours: dropped quietly.

:func:`screen_key_message` returns None for other event types, an :class:`AcceptedKey`, or a
:class:`RejectedKey` whose ``reason`` says why. It never raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from matrixrtc.e2ee.messages import DRAFT_KEY_TYPES, ELEMENT_CALL_KEYS_TYPE, parse_key_message

__all__ = [
    "KEY_MESSAGE_TYPES",
    "AcceptedKey",
    "DropReason",
    "RejectedKey",
    "screen_key_message",
]

KEY_MESSAGE_TYPES = frozenset({ELEMENT_CALL_KEYS_TYPE, *DRAFT_KEY_TYPES})
_MAX_SAFE_INT = 2**53 - 1


class DropReason(StrEnum):
    MALFORMED = "malformed"
    OTHER_ROOM = "other_room"
    PLAINTEXT_IN_ENCRYPTED_ROOM = "plaintext_in_encrypted_room"
    PLAINTEXT_NOT_ALLOWED = "plaintext_not_allowed"
    NO_DEVICE = "no_device"  # plaintext draft message: nothing names a device
    UNVERIFIED_SENDER = "unverified_sender"  # Olm-decrypted, but no known device owns the key
    CLAIMED_DEVICE_MISMATCH = "claimed_device_mismatch"
    OWN_DEVICE = "own_device"

    @property
    def suspicious(self) -> bool:
        """Worth a warning: someone tried to hand us a key in a way we do not accept."""
        return self not in (DropReason.OTHER_ROOM, DropReason.OWN_DEVICE)


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptedKey:
    """A key for :meth:`KeyManager.receive_key`, with the device that really sent it."""

    user_id: str
    device_id: str
    member_id: str | None
    index: int
    key: bytes = field(repr=False)
    sent_ts: int | None  # the sender's clock; statistics only
    dialect: str
    encrypted: bool


@dataclass(frozen=True, slots=True)
class RejectedKey:
    reason: DropReason
    detail: str = ""


def _sent_ts(content: object) -> int | None:
    ts = content.get("sent_ts") if isinstance(content, dict) else None
    if isinstance(ts, int) and not isinstance(ts, bool) and 0 <= ts <= _MAX_SAFE_INT:
        return ts
    return None


def screen_key_message(
    *,
    event_type: str,
    content: Any,
    sender: str,
    sender_device: str | None,
    encrypted: bool,
    room_id: str,
    room_encrypted: bool,
    own_device: tuple[str, str],
    allow_plaintext: bool = False,
) -> AcceptedKey | RejectedKey | None:
    """Decide about one received to-device message (see the module docstring).

    ``sender_device`` must be the *verified* Olm sender device (None for plaintext).
    """
    if event_type not in KEY_MESSAGE_TYPES:
        return None
    parsed = parse_key_message(event_type, content)
    if parsed is None:
        return RejectedKey(DropReason.MALFORMED, "unparseable key message")
    if parsed.room_id != room_id:
        return RejectedKey(DropReason.OTHER_ROOM, parsed.room_id)
    claimed = parsed.claimed_device_id
    if encrypted:
        if not sender_device:
            return RejectedKey(DropReason.UNVERIFIED_SENDER, "no verified Olm sender device")
        if claimed is not None and claimed != sender_device:
            return RejectedKey(
                DropReason.CLAIMED_DEVICE_MISMATCH,
                f"claims device {claimed!r}, Olm sender device is {sender_device!r}",
            )
        device = sender_device
    elif room_encrypted:
        return RejectedKey(DropReason.PLAINTEXT_IN_ENCRYPTED_ROOM, "key message was not Olm")
    elif not allow_plaintext:
        return RejectedKey(DropReason.PLAINTEXT_NOT_ALLOWED, "key message was not Olm")
    elif claimed is None:
        return RejectedKey(DropReason.NO_DEVICE, "plaintext message names no device")
    else:
        device = claimed
    if (sender, device) == own_device:
        return RejectedKey(DropReason.OWN_DEVICE)
    return AcceptedKey(
        user_id=sender,
        device_id=device,
        member_id=parsed.member_id,
        index=parsed.index,
        key=parsed.key,
        sent_ts=_sent_ts(content),
        dialect=parsed.dialect,
        encrypted=encrypted,
    )
