"""Prometheus metrics of the authorization service, the delayed-leave jobs and the controller.

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
    "CONNECTIONS_REFUSED",
    "CONTROLLER_AVERTED",
    "CONTROLLER_CYCLE",
    "CONTROLLER_DOUBTS",
    "CONTROLLER_ERRORS",
    "CONTROLLER_LEADER",
    "DELAYED_LEAVE",
    "DELAYED_LEAVE_JOBS",
    "GHOST_KICKS",
    "HEADER_TIMEOUTS",
    "OPENID_CACHE",
    "OPENID_LOOKUP",
    "REQUESTS",
    "ROOMS_CLOSED",
    "ROOMS_CREATED",
    "SLOW_BODIES",
    "TOKENS_ISSUED",
    "TOKEN_LIMITS",
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
CONNECTIONS_REFUSED = Counter(
    _P + "connections_refused_total",
    "Connections answered 503 and closed by a connection cap, by cap",
    ["cap"],
)
HEADER_TIMEOUTS = Counter(
    _P + "header_timeouts_total", "Connections closed: request headers not received in time"
)
SLOW_BODIES = Counter(
    _P + "body_timeouts_total", "Requests answered 408: body not received in time"
)


def render() -> bytes:
    """The exposition text for ``GET /metrics`` (aggregated across workers when needed)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(_DEFAULT)


# -- the controller (sfu.controller.controller) ---------------------------------------------

GHOST_KICKS = Counter(
    _P + "controller_removals_total",
    "LiveKit participants removed by the controller, by reason",
    ["reason"],
)
ROOMS_CLOSED = Counter(
    _P + "controller_rooms_closed_total", "LiveKit rooms closed by the controller (no members)"
)
CONTROLLER_LEADER = Gauge(
    _P + "controller_leader",
    "1 while this process is the acting controller",
    multiprocess_mode="livesum",
)
CONTROLLER_CYCLE = Histogram(
    _P + "controller_cycle_seconds",
    "Duration of one controller cycle (LiveKit listing, Matrix state, actions)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONTROLLER_ERRORS = Counter(
    _P + "controller_errors_total", "Failed controller steps, by step", ["step"]
)
CONTROLLER_AVERTED = Counter(
    _P + "controller_removals_averted_total",
    "removals withheld: the homeserver's current state, read just before, gave no reason",
)
CONTROLLER_DOUBTS = Counter(
    _P + "controller_membership_doubts_total",
    "no_membership removals withheld: the homeserver may hold a sticky membership not seen",
)
TOKEN_LIMITS = Counter(
    _P + "token_limits_total", "Token requests refused by a configured limit", ["limit"]
)
