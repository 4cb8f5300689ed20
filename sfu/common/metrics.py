"""Prometheus metrics of the authorization service and the delayed-leave controller.

With ``--workers N`` each worker writes to ``PROMETHEUS_MULTIPROC_DIR`` (set by the
supervisor) and ``/metrics`` aggregates all workers.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY as _DEFAULT
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "DELAYED_LEAVE",
    "DELAYED_LEAVE_JOBS",
    "OPENID_CACHE",
    "OPENID_LOOKUP",
    "REQUESTS",
    "ROOMS_CREATED",
    "TOKENS_ISSUED",
    "WEBHOOKS",
    "render",
]

_P = "matrixrtc_sfu_"

REQUESTS = Counter(
    _P + "requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"]
)
OPENID_LOOKUP = Histogram(
    _P + "openid_lookup_seconds",
    "OpenID userinfo lookups at homeservers, by outcome",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OPENID_CACHE = Counter(_P + "openid_cache_total", "OpenID cache lookups by result", ["result"])
TOKENS_ISSUED = Counter(_P + "tokens_issued_total", "LiveKit JWTs issued", ["endpoint", "access"])
ROOMS_CREATED = Counter(
    _P + "rooms_created_total", "CreateRoom calls on LiveKit, by result", ["result"]
)
DELAYED_LEAVE = Counter(
    _P + "delayed_leave_actions_total",
    "Delegated delayed-leave actions sent to homeservers, by action and result",
    ["action", "result"],
)
DELAYED_LEAVE_JOBS = Gauge(
    _P + "delayed_leave_jobs", "Active delegated delayed-leave jobs", multiprocess_mode="livesum"
)
WEBHOOKS = Counter(_P + "webhooks_total", "LiveKit webhooks received, by result", ["result"])


def render() -> bytes:
    """The exposition text for ``GET /metrics`` (aggregated across workers when needed)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(_DEFAULT)
