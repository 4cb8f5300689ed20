"""MSC4354 (sticky events) names, unstable prefix included, in one place.

A sticky event is a room event the server keeps handing to clients for a while after it was
sent; MatrixRTC's sticky membership form (``org.matrix.msc4143.rtc.member``) uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from matrixrtc.model._json import as_int, get_dict

__all__ = [
    "MAX_STICKY_DURATION_MS",
    "STICKY_DURATION_PARAM",
    "STICKY_FIELD",
    "STICKY_KEY_FIELD",
    "STICKY_TTL_FIELD",
    "UNSTABLE_FEATURE",
    "sticky_duration_ms",
    "sticky_expires_at",
]

# In /versions' unstable_features when the homeserver implements sticky events.
UNSTABLE_FEATURE: Final = "org.matrix.msc4354"
# Query parameter of a send (or delayed send) that makes the event sticky for that long.
STICKY_DURATION_PARAM: Final = f"{UNSTABLE_FEATURE}.sticky_duration_ms"
# PDU field ``{"duration_ms": N}`` on a sticky event, and the name of the /sync room section
# that carries live sticky events outside the timeline window.
STICKY_FIELD: Final = "msc4354_sticky"
# Content field naming the sticky key: sticky events of one sender with one key replace each
# other (a membership's member id, a ring's slot id).
STICKY_KEY_FIELD: Final = "msc4354_sticky_key"
# ``unsigned`` field: how much of the stickiness is left when the server delivered the event.
STICKY_TTL_FIELD: Final = "msc4354_sticky_duration_ttl_ms"
# Stickiness is capped at one hour (js-sdk clamps larger values).
MAX_STICKY_DURATION_MS: Final = 3_600_000


def sticky_duration_ms(event: Mapping[str, object], default_ms: int | None = None) -> int | None:
    """``msc4354_sticky.duration_ms`` capped at one hour; None (not sticky) if absent or 0.

    ``default_ms`` stands in when the event has no duration (js-sdk has no such fallback).
    """
    sticky = get_dict(event.get(STICKY_FIELD))
    duration = as_int(sticky.get("duration_ms")) if sticky is not None else None
    if not duration or duration < 0:
        duration = default_ms
    if not duration or duration < 0:
        return None
    return min(duration, MAX_STICKY_DURATION_MS)


def sticky_expires_at(
    event: Mapping[str, object], received_ms: int, default_duration_ms: int | None = None
) -> int | None:
    """When a sticky event stops being sticky, computed at receipt (js-sdk ``MatrixEvent``).

    Only events with a duration are sticky. Then ``unsigned.msc4354_sticky_duration_ttl_ms``
    (time left, from the server) wins; otherwise ``min(received, origin_server_ts) +
    duration`` (an ``origin_server_ts`` from the future does not extend it).
    """
    duration = sticky_duration_ms(event, default_duration_ms)
    if duration is None:
        return None
    unsigned = get_dict(event.get("unsigned"))
    ttl = as_int(unsigned.get(STICKY_TTL_FIELD)) if unsigned is not None else None
    if ttl:
        # js-sdk trusts the server's bound; we cap it too, so a bad value cannot pin a member.
        return received_ms + min(max(ttl, 0), MAX_STICKY_DURATION_MS)
    ots = as_int(event.get("origin_server_ts"))
    start = received_ms if ots is None else min(received_ms, ots)
    return start + duration
