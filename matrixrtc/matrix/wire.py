"""Wire helpers of the homeserver adapter (pure): error answers to typed errors, raw sync
sections to event lists, sticky lifetimes, transport lists. None of them raises on odd input."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import structlog

from matrixrtc.errors import RemoteError
from matrixrtc.matrix.errors import DelayTooLong, HomeserverError, RateLimited, TokenRejected
from matrixrtc.model import msc4354

__all__ = [
    "delay_id",
    "error_from",
    "event_id",
    "events",
    "int_or_none",
    "max_delay",
    "now_ms",
    "sticky_ttl_ms",
    "transport_list",
    "txn",
]

log = structlog.get_logger(__name__)
JsonDict = dict[str, Any]


def now_ms() -> int:
    return int(time.time() * 1000)


def sticky_ttl_ms(ev: Mapping[str, Any]) -> int:
    """Time left on a sticky event when received: the server's remaining time, else its
    duration; MSC4354 caps stickiness at one hour."""
    unsigned = ev.get("unsigned")
    ttl = unsigned.get(msc4354.STICKY_TTL_FIELD) if isinstance(unsigned, dict) else None
    if not isinstance(ttl, int):
        sticky = ev.get(msc4354.STICKY_FIELD)
        ttl = sticky.get("duration_ms") if isinstance(sticky, dict) else None
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        return 0
    return max(0, min(ttl, msc4354.MAX_STICKY_DURATION_MS))


def txn() -> str:
    return uuid.uuid4().hex


def events(section: Any) -> list[JsonDict]:
    if not isinstance(section, dict):
        return []
    events = section.get("events")
    if not isinstance(events, list):
        return []
    return [e for e in events if isinstance(e, dict)]


def event_id(resp: JsonDict) -> str:
    event_id = resp.get("event_id")
    if not isinstance(event_id, str):
        raise RemoteError("homeserver answered without an event_id")
    return event_id


def delay_id(resp: JsonDict) -> str:
    delay_id = resp.get("delay_id")
    if not isinstance(delay_id, str) or not delay_id:
        raise RemoteError("homeserver answered a delayed event without a delay_id")
    return delay_id


def transport_list(value: Any, what: str) -> list[JsonDict]:
    if not isinstance(value, list):
        return []
    out = [t for t in value if isinstance(t, dict) and isinstance(t.get("type"), str)]
    if len(out) != len(value):
        log.info("homeserver.transport_dropped", source=what, dropped=len(value) - len(out))
    return out


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def error_from(status: int, body: JsonDict, retry_after: str | None) -> HomeserverError:
    errcode = body.get("errcode")
    errcode = errcode if isinstance(errcode, str) else f"HTTP_{status}"
    error = body.get("error")
    error = error if isinstance(error, str) else ""
    if status == 429 or errcode == "M_LIMIT_EXCEEDED":
        ms = int_or_none(body.get("retry_after_ms"))
        if ms is None and retry_after is not None and retry_after.isdigit():
            ms = int(retry_after) * 1000
        return RateLimited(status, errcode, error, body, ms)
    if errcode == "ORG.MATRIX.MSC4140_DELAY_TOO_LARGE" or (
        body.get("org.matrix.msc4140.errcode") == "M_MAX_DELAY_EXCEEDED"
    ):
        return DelayTooLong(
            status,
            errcode,
            error,
            body,
            max_delay(body.get("org.matrix.msc4140.max_delay"), error),
        )
    if status == 401 and errcode in ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN"):
        return TokenRejected(status, errcode, error, body)
    return HomeserverError(status, errcode, error, body)


def max_delay(value: Any, error: str) -> int | None:
    ms = int_or_none(value)
    if ms is not None:
        return ms
    # Synapse says it only in prose: "... exceeds the allowed maximum (86400000ms)".
    marker = "maximum ("
    at = error.find(marker)
    if at >= 0:
        digits = error[at + len(marker) :].split("ms", 1)[0]
        if digits.isdigit():
            return int(digits)
    return None
