"""Olm-decrypted to-device events of types nio does not handle itself.

nio's Olm machine decrypts ``m.room.encrypted`` to-device events, verifies the payload's
``sender``/``recipient``/``recipient_keys`` and then *drops* every inner type other than room
keys and dummies. MatrixRTC needs those other types (``io.element.call.encryption_keys``,
MSC2746 call signalling), so this subclass keeps them, with the Curve25519 key the Olm
session is bound to. :mod:`matrixrtc.matrix.homeserver` turns that key into a verified
sender device by looking it up in the device store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nio.crypto import Olm

__all__ = ["CapturedOlmPayload", "CapturingOlm"]

# Inner types nio itself consumes; everything else is captured for us.
_NIO_TYPES = frozenset({"m.room_key", "m.forwarded_room_key", "m.dummy"})


@dataclass(frozen=True, slots=True)
class CapturedOlmPayload:
    sender: str
    sender_curve25519: str
    payload: dict[str, Any]


class CapturingOlm(Olm):  # type: ignore[misc]  # nio is untyped
    """nio's Olm machine that also keeps decrypted payloads of other inner types."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.captured: list[CapturedOlmPayload] = []

    def _handle_olm_event(self, sender: str, sender_key: str, payload: dict[Any, Any]) -> Any:
        if payload.get("type") in _NIO_TYPES:
            return super()._handle_olm_event(sender, sender_key, payload)
        self.captured.append(CapturedOlmPayload(sender, sender_key, payload))
        return None

    def take_captured(self) -> list[CapturedOlmPayload]:
        out, self.captured = self.captured, []
        return out
