"""OpenID token validation through the federation ``openid/userinfo`` API, with a cache.

Resolution follows the Matrix server-server spec (as gomatrixserverlib does): IP literal
(default port 8448), explicit port, ``/.well-known/matrix/server`` (re-resolved without
well-known), SRV ``_matrix-fed._tcp`` then ``_matrix._tcp``, else ``:8448``. An operator's
override map (server name → base URL) comes first and is how private or test homeservers are
reached. Every connection passes the SSRF guard of :mod:`sfu.common.netguard`.

Validated tokens are cached until ``min(expires_in, max_ttl)`` after first sight, so a
reconnect or a multi-SFU subscribe does not hit the homeserver again; failures are cached for a
few seconds only; concurrent lookups of one token share one request.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import quote

import structlog

from matrixrtc.tasks import OwnedTasks
from sfu.common import metrics
from sfu.common.netguard import BlockedAddressError, FetchError, GuardedHttp, HostResolver
from sfu.common.servername import ServerName, parse_server_name

__all__ = ["Destination", "LookupOutcome", "OpenIDValidator", "federation_destinations"]

log = structlog.get_logger(__name__)

_USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
_WELL_KNOWN_MAX = 50 * 1024  # gomatrixserverlib's limit


class LookupOutcome(Enum):
    OK = "ok"
    REJECTED = "rejected"  # the homeserver answered, but not with a valid sub
    MISMATCH = "mismatch"  # sub's server part is not matrix_server_name
    BLOCKED = "blocked"  # SSRF guard refused every destination
    UNREACHABLE = "unreachable"
    INVALID_NAME = "invalid_name"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where to send a federation request: base URL, Host header and TLS server name."""

    base_url: str
    host_header: str | None = None
    tls_server_name: str | None = None


@dataclass(slots=True)
class _WellKnownEntry:
    target: str | None
    expires: float


async def federation_destinations(
    name: ServerName,
    *,
    overrides: Mapping[str, str],
    resolver: HostResolver,
    well_known: Callable[[ServerName], Awaitable[str | None]],
) -> list[Destination]:
    """The ordered destinations for ``name`` (see module docstring)."""
    if name.raw in overrides:
        return [Destination(overrides[name.raw].rstrip("/"))]
    if name.is_ip:
        port = name.port or 8448
        return [Destination(f"https://{name.url_host}:{port}", name.raw, None)]
    if name.port is not None:
        return [Destination(f"https://{name.host}:{name.port}", name.raw, name.host)]
    delegated = await well_known(name)
    if delegated is not None:
        target = parse_server_name(delegated)
        if target is None:
            raise FetchError("well-known m.server is not a valid server name")
        if target.is_ip:
            port = target.port or 8448
            return [Destination(f"https://{target.url_host}:{port}", target.raw, None)]
        if target.port is not None:
            return [Destination(f"https://{target.host}:{target.port}", target.raw, target.host)]
        return await _srv_or_default(target, resolver)
    return await _srv_or_default(name, resolver)


async def _srv_or_default(name: ServerName, resolver: HostResolver) -> list[Destination]:
    for prefix in ("_matrix-fed._tcp.", "_matrix._tcp."):
        records = await resolver.resolve_srv(prefix + name.host)
        if records:
            return [Destination(f"https://{h}:{p}", name.raw, name.host) for h, p in records]
    return [Destination(f"https://{name.host}:8448", name.raw, name.host)]


@dataclass(slots=True)
class _CacheEntry:
    sub: str | None
    expires: float


class OpenIDValidator:
    """Exchanges OpenID tokens for Matrix user ids; owns its cache and in-flight lookups."""

    def __init__(
        self,
        http: GuardedHttp,
        resolver: HostResolver,
        *,
        overrides: Mapping[str, str],
        cache_size: int = 10_000,
        max_ttl: float = 3600.0,
        failure_ttl: float = 5.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._resolver = resolver
        self._overrides = dict(overrides)
        self._cache: OrderedDict[tuple[str, str], _CacheEntry] = OrderedDict()
        self._cache_size = cache_size
        self._max_ttl = max_ttl
        self._failure_ttl = failure_ttl
        self._timeout = timeout
        self._clock = clock
        self._inflight: dict[tuple[str, str], asyncio.Task[str | None]] = {}
        self._tasks = OwnedTasks("openid", log, event_prefix="openid")
        self._well_known: dict[str, _WellKnownEntry] = {}

    async def close(self) -> None:
        try:
            await self._tasks.cancel()  # lookups in flight: their requests see the outcome
        finally:
            self._inflight.clear()

    async def user_id(self, access_token: str, server_name: str, expires_in: int) -> str | None:
        """The token's ``sub`` if the homeserver vouches for it, else None."""
        key = (server_name, access_token)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > now:
                metrics.OPENID_CACHE.labels("hit").inc()
                if entry.sub is not None and expires_in > 0:
                    # A later request may claim a shorter life than the first one did.
                    entry.expires = min(entry.expires, now + expires_in)
                return entry.sub
            del self._cache[key]
        metrics.OPENID_CACHE.labels("miss").inc()
        task = self._inflight.get(key)
        if task is None:
            task = self._tasks.spawn(
                self._lookup(access_token, server_name),
                f"lookup {server_name}",
                context=contextvars.Context(),
                awaited=True,
            )
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
            sub = await asyncio.shield(task)
            self._store(key, sub, expires_in)
            return sub
        return await asyncio.shield(task)

    def _store(self, key: tuple[str, str], sub: str | None, expires_in: int) -> None:
        if self._cache_size <= 0:
            return
        ttl = min(float(expires_in), self._max_ttl) if sub is not None else self._failure_ttl
        if ttl <= 0:
            return
        self._cache[key] = _CacheEntry(sub, self._clock() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, access_token: str, server_name: str) -> str | None:
        start = time.perf_counter()
        outcome = LookupOutcome.UNREACHABLE
        try:
            sub, outcome = await self._lookup_inner(access_token, server_name)
            return sub
        finally:
            metrics.OPENID_LOOKUP.labels(outcome.value).observe(time.perf_counter() - start)

    async def _lookup_inner(
        self, access_token: str, server_name: str
    ) -> tuple[str | None, LookupOutcome]:
        name = parse_server_name(server_name)
        if name is None:
            log.info("openid lookup refused", reason="invalid server name")
            return None, LookupOutcome.INVALID_NAME
        try:
            async with asyncio.timeout(self._timeout):
                dests = await federation_destinations(
                    name,
                    overrides=self._overrides,
                    resolver=self._resolver,
                    well_known=self._lookup_well_known,
                )
                blocked = False
                query = "?access_token=" + quote(access_token, safe="")
                for dest in dests:
                    headers = {"Host": dest.host_header} if dest.host_header else None
                    try:
                        res = await self._http.request(
                            "GET",
                            dest.base_url + _USERINFO_PATH + query,
                            headers=headers,
                            server_hostname=dest.tls_server_name,
                            timeout=self._timeout,
                        )
                    except BlockedAddressError as exc:
                        log.warning(
                            "openid destination refused", server=server_name, reason=str(exc)
                        )
                        blocked = True
                        continue
                    except FetchError as exc:
                        log.info("openid destination failed", server=server_name, reason=str(exc))
                        continue
                    return self._check_sub(res.status, res.body, server_name)
        except BlockedAddressError as exc:
            log.warning("openid lookup refused", server=server_name, reason=str(exc))
            return None, LookupOutcome.BLOCKED
        except (FetchError, OSError, TimeoutError) as exc:
            log.info("openid lookup failed", server=server_name, reason=str(exc)[:200])
            return None, LookupOutcome.UNREACHABLE
        return None, LookupOutcome.BLOCKED if blocked else LookupOutcome.UNREACHABLE

    @staticmethod
    def _check_sub(status: int, body: object, server_name: str) -> tuple[str | None, LookupOutcome]:
        if not 200 <= status < 300 or not isinstance(body, dict):
            log.info("openid token rejected by homeserver", server=server_name, status=status)
            return None, LookupOutcome.REJECTED
        sub = body.get("sub")
        if not isinstance(sub, str):
            log.info("openid userinfo without sub", server=server_name)
            return None, LookupOutcome.REJECTED
        parts = sub.split(":", 1)
        if len(parts) != 2 or parts[1] != server_name:
            log.warning("openid sub does not belong to server", server=server_name, sub=sub)
            return None, LookupOutcome.MISMATCH
        return sub, LookupOutcome.OK

    async def _lookup_well_known(self, name: ServerName) -> str | None:
        now = self._clock()
        cached = self._well_known.get(name.host)
        if cached is not None and cached.expires > now:
            return cached.target
        target: str | None = None
        ttl = 300.0  # retry a missing well-known after 5 minutes
        try:
            res = await self._http.request(
                "GET",
                f"https://{name.host}/.well-known/matrix/server",
                timeout=min(self._timeout, 5.0),
                max_bytes=_WELL_KNOWN_MAX,
                max_redirects=5,
            )
        except BlockedAddressError:
            raise
        except FetchError as exc:
            log.info("well-known lookup failed", server=name.raw, reason=str(exc)[:200])
        else:
            if res.status == 200 and isinstance(res.body, dict):
                server = res.body.get("m.server")
                if isinstance(server, str) and server:
                    target = server
                    ttl = _max_age(res.cache_control, default=3600.0)
        if len(self._well_known) > 10_000:
            self._well_known.clear()
        self._well_known[name.host] = _WellKnownEntry(target, now + ttl)
        return target


def _max_age(cache_control: str | None, *, default: float) -> float:
    if cache_control:
        for part in cache_control.split(","):
            k, _, v = part.strip().partition("=")
            if k.lower() == "max-age" and v.isdigit():
                return min(max(float(v), 60.0), 48 * 3600.0)
    return default
