"""MatrixRTC slots (``org.matrix.msc4143.rtc.slot`` state), as matrix-js-sdk 43 reads them.

A slot is a state event whose state key is the slot id (``m.call#ROOM``) and whose content
says whether the slot is open: ``{"status": "open" | "closed", "application": {"type":
"m.call"}, "encryption": {"type": "org.matrix.msc4143.per_member"}}`` (js-sdk
``utils.isSlotClosed``, ``MatrixRTCSession.ensureRtcSlotOpen``).

* No slot event: the slot's state is unknown (js-sdk ``undefined``); memberships count, but a
  notification for it is refused.
* A slot event whose ``status`` is not ``"open"``, or whose ``application`` is not an object
  with the slot's application type: **closed**. js-sdk then ignores every sticky membership
  of the slot (state-form memberships still count) and refuses notifications for it.

Public API::

    slot_status(content_or_None, application="m.call") -> SlotStatus
    open_slot_content(existing_or_None, application="m.call", encryption=None) -> dict | None
        # the content that opens the slot keeping any other content; None if already open
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final

from matrixrtc.model._json import JsonDict, get_dict

__all__ = ["SLOT_ENCRYPTION_PER_MEMBER", "SlotStatus", "open_slot_content", "slot_status"]

# js-sdk 43 RTC_SLOT_ENCRYPTION_PER_MEMBER: per-member media keys (what we and EC do).
SLOT_ENCRYPTION_PER_MEMBER: Final = "org.matrix.msc4143.per_member"


class SlotStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    UNKNOWN = "unknown"  # no slot event in the room


def slot_status(content: object, application: str = "m.call") -> SlotStatus:
    """js-sdk ``isSlotClosed``: the slot event's content (None: no event)."""
    if content is None:
        return SlotStatus.UNKNOWN
    d = get_dict(content)
    if d is None:
        return SlotStatus.CLOSED
    app = get_dict(d.get("application"))
    if d.get("status") != "open" or app is None or app.get("type") != application:
        return SlotStatus.CLOSED
    return SlotStatus.OPEN


def open_slot_content(
    existing: Mapping[str, object] | None,
    application: str = "m.call",
    encryption: str | None = None,
) -> JsonDict | None:
    """js-sdk ``ensureRtcSlotOpen``: other content kept, ``status``/``application``/
    ``encryption`` set (``encryption=None`` removes it, as js-sdk's ``undefined`` does).
    None when the slot is already open with exactly that application and encryption."""
    app: JsonDict = {"type": application}
    enc: JsonDict | None = {"type": encryption} if encryption is not None else None
    if (
        existing is not None
        and existing.get("status") == "open"
        and existing.get("application") == app
        and existing.get("encryption") == enc
    ):
        return None
    out: JsonDict = {k: v for k, v in (existing or {}).items() if isinstance(k, str)}  # type: ignore[misc]
    out["status"] = "open"
    out["application"] = app
    if enc is None:
        out.pop("encryption", None)
    else:
        out["encryption"] = enc
    return out
