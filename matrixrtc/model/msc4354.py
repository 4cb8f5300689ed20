"""MSC4354 (sticky events) names, unstable prefix included, in one place.

A sticky event is a room event the server keeps handing to clients for a while after it was
sent; MatrixRTC's sticky membership form (``org.matrix.msc4143.rtc.member``) uses it.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MAX_STICKY_DURATION_MS",
    "STICKY_DURATION_PARAM",
    "STICKY_FIELD",
    "STICKY_TTL_FIELD",
    "UNSTABLE_FEATURE",
]

# In /versions' unstable_features when the homeserver implements sticky events.
UNSTABLE_FEATURE: Final = "org.matrix.msc4354"
# Query parameter of a send (or delayed send) that makes the event sticky for that long.
STICKY_DURATION_PARAM: Final = f"{UNSTABLE_FEATURE}.sticky_duration_ms"
# PDU field ``{"duration_ms": N}`` on a sticky event, and the name of the /sync room section
# that carries live sticky events outside the timeline window.
STICKY_FIELD: Final = "msc4354_sticky"
# ``unsigned`` field: how much of the stickiness is left when the server delivered the event.
STICKY_TTL_FIELD: Final = "msc4354_sticky_duration_ttl_ms"
# Stickiness is capped at one hour (js-sdk clamps larger values).
MAX_STICKY_DURATION_MS: Final = 3_600_000
