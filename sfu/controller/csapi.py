"""The homeserver's client-server API as the delayed-leave controller needs it (MSC4140).

Base URL from ``LIVEKIT_CS_API_URL_OVERRIDES``, else our federation override for that server,
else ``https://<server>/.well-known/matrix/client`` → ``m.homeserver.base_url`` (cached 4 h, as
lk-jwt-service does). Restart/send are POSTed with body ``{}`` and without an access token: the
delay id is the capability. All requests go through the SSRF guard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import quote, urlsplit

import structlog

from sfu.common.netguard import BlockedAddressError, FetchError, GuardedHttp
from sfu.common.servername import parse_server_name

__all__ = ["ActionResult", "CsApi", "DelayAction"]

log = structlog.get_logger(__name__)

DELAYED_EVENTS_PATH = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events"
_CACHE_TTL = 4 * 3600.0


class DelayAction(Enum):
    RESTART = "restart"
    SEND = "send"


class ActionResult(Enum):
    OK = "ok"
    GONE = "gone"  # 404: already sent, cancelled or unknown
    RETRY = "retry"  # transient: 5xx, 429, connection failure


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    result: ActionResult
    status: int = 0
    retry_after: float | None = None


class CsApi:
    """Resolves client-server API URLs and performs delayed-event actions."""

    def __init__(
        self,
        http: GuardedHttp,
        overrides: Mapping[str, str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._overrides = {k: v.rstrip("/") for k, v in overrides.items()}
        self._cache: dict[str, tuple[str, float]] = {}
        self._clock = clock

    async def base_url(self, server_name: str) -> str | None:
        """The CS-API base URL of ``server_name``, or None when it cannot be found."""
        if server_name in self._overrides:
            return self._overrides[server_name]
        cached = self._cache.get(server_name)
        now = self._clock()
        if cached is not None and cached[1] > now:
            return cached[0]
        name = parse_server_name(server_name)
        if name is None:
            return None
        try:
            res = await self._http.request(
                "GET",
                f"https://{name.url_host}{'' if name.port is None else f':{name.port}'}"
                "/.well-known/matrix/client",
                timeout=5.0,
                max_bytes=50 * 1024,
                max_redirects=5,
            )
        except (BlockedAddressError, FetchError) as exc:
            log.info("client well-known lookup failed", server=server_name, reason=str(exc)[:200])
            return None
        hs = res.body.get("m.homeserver") if isinstance(res.body, dict) else None
        base = hs.get("base_url") if isinstance(hs, dict) else None
        if res.status != 200 or not isinstance(base, str):
            return None
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        base = base.rstrip("/")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[server_name] = (base, now + _CACHE_TTL)
        return base

    async def act(self, base_url: str, delay_id: str, action: DelayAction) -> ActionOutcome:
        """POST restart/send; never raises."""
        url = f"{base_url}{DELAYED_EVENTS_PATH}/{quote(delay_id, safe='')}/{action.value}"
        try:
            res = await self._http.request("POST", url, json_body={}, timeout=5.0)
        except (BlockedAddressError, FetchError) as exc:
            log.info("delayed event action failed", action=action.value, reason=str(exc)[:200])
            return ActionOutcome(ActionResult.RETRY)
        if res.status in (200, 204):
            return ActionOutcome(ActionResult.OK, res.status)
        if res.status == 404:
            return ActionOutcome(ActionResult.GONE, res.status)
        retry_after: float | None = None
        if res.status == 429:
            if res.retry_after and res.retry_after.strip().isdigit():
                retry_after = float(res.retry_after.strip())
            elif isinstance(res.body, dict) and isinstance(res.body.get("retry_after_ms"), int):
                retry_after = res.body["retry_after_ms"] / 1000.0
        return ActionOutcome(ActionResult.RETRY, res.status, retry_after)
