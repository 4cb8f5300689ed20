"""How far this device's wall clock runs ahead of the homeserver's (pure).

State-form memberships expire at ``created_ts + expires``, where ``created_ts`` is the
homeserver's clock (the first join's ``origin_server_ts``). js-sdk compares that with the
device's own clock, uncorrected (spec matrixrtc.md "Clock"). A device whose clock runs ahead
by ``X`` then sees every other member's membership expire ``X`` before its refresh, once per
expiry period: the member vanishes from its call (keys rotate, media stops) until the refresh
arrives. Measured by the chaos suite's clock-ahead-30s scenario with 40 s memberships.

The homeserver says how old each event is when it serves it (``unsigned.age``), so an event
received at local time ``r`` gives one sample ``r - (origin_server_ts + age)``: the skew plus
the time the response took to arrive (never less than the skew). The estimate is the median
of the last :data:`SAMPLES` samples; below :data:`TOLERANCE_MS` it is taken as 0, so clocks
that agree keep js-sdk's behaviour exactly and transit time under load changes nothing.

Public API::

    clock = ServerClock()
    clock.observe(event, received_ms)   # any event from a live sync response
    clock.offset_ms                      # local - homeserver, 0 when within tolerance
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["SAMPLES", "TOLERANCE_MS", "ServerClock"]

SAMPLES: Final = 16
TOLERANCE_MS: Final = 2_000


class ServerClock:
    def __init__(self) -> None:
        self._samples: deque[int] = deque(maxlen=SAMPLES)

    def observe(self, event: Mapping[str, Any], received_ms: int) -> None:
        """One event as a live sync response delivered it, at local time ``received_ms``."""
        ots = event.get("origin_server_ts")
        unsigned = event.get("unsigned")
        age = unsigned.get("age") if isinstance(unsigned, Mapping) else None
        if not isinstance(ots, int) or isinstance(ots, bool):
            return
        if not isinstance(age, int) or isinstance(age, bool) or age < 0:
            return
        self._samples.append(received_ms - (ots + age))

    @property
    def offset_ms(self) -> int:
        """How far the local clock runs ahead of the homeserver's (negative: behind)."""
        if not self._samples:
            return 0
        median = int(statistics.median(self._samples))
        return median if abs(median) >= TOLERANCE_MS else 0
