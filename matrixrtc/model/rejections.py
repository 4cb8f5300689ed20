"""Info-level log of rejected memberships, rate-limited per sender (pure apart from logging).

A membership that another client sends and we drop must never vanish silently: the operator
needs to see *who* sent it, *which field* was wrong and *why* (issue 12: two clients each
ignoring the other's schema without a word at info level). One noisy or hostile sender must
not flood the log either (issue 18: a hostile room), so each sender gets ``burst`` lines (one
by default) per interval (a minute), and the next line it gets reports how many rejections
were suppressed meanwhile.

Public API::

    log = RejectionLog(interval_s=60.0, burst=1, clock=time.monotonic)
    log.rejected(kind="rtc.member", sender=…, field=…, reason=…, event_id=…)
    log.admit(sender)            # None: suppressed; else how many were suppressed before
                                 # (for callers that write their own line)
    MEMBERSHIP_REJECTIONS        # the process-wide default used by parse_membership_event

The clock is injected (tests pass a fake one); the default is ``time.monotonic``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

__all__ = ["MEMBERSHIP_REJECTIONS", "RejectionLog"]

_log = structlog.get_logger("matrixrtc.model")

_MAX_SENDERS: Final = 4096  # bounded memory however many senders there are


@dataclass(slots=True)
class _Bucket:
    window_start: float
    logged: int = 0
    suppressed: int = 0


class RejectionLog:
    """Per-sender rate limit: ``burst`` lines per ``interval_s``, then a summary line."""

    def __init__(
        self,
        *,
        interval_s: float = 60.0,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def admit(self, sender: str) -> int | None:
        """Count one rejection from ``sender``: None when it must not be logged, else the
        number of its rejections suppressed since its last logged one."""
        now = self._clock()
        bucket = self._buckets.get(sender)
        suppressed = 0
        if bucket is None or now - bucket.window_start >= self.interval_s:
            suppressed = bucket.suppressed if bucket is not None else 0
            bucket = _Bucket(window_start=now)
            self._buckets[sender] = bucket
        self._buckets.move_to_end(sender)
        while len(self._buckets) > _MAX_SENDERS:
            self._buckets.popitem(last=False)
        if bucket.logged >= self.burst:
            bucket.suppressed += 1
            return None
        bucket.logged += 1
        return suppressed

    def rejected(
        self,
        *,
        kind: str,
        sender: str,
        field: str | None,
        reason: str,
        **context: object,
    ) -> bool:
        """Record one rejection; returns whether a line was logged."""
        suppressed = self.admit(sender)
        if suppressed is None:
            return False
        if suppressed:
            context = {"suppressed_before": suppressed, **context}
        _log.info(
            "membership_rejected",
            kind=kind,
            sender=sender,
            field=field or "content",
            reason=reason,
            **context,
        )
        return True


# Process-wide default: parse_membership_event logs here unless given another log.
MEMBERSHIP_REJECTIONS: Final = RejectionLog()
