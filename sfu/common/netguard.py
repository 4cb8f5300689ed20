"""Outbound HTTP that a remote party can steer, guarded against SSRF.

Everything the service fetches because of a request body (federation ``.well-known``,
``openid/userinfo``, the client ``.well-known``, delayed-event restart/send) goes through
:class:`GuardedHttp`:

- every address a host name resolves to must be globally routable, unless the host (or the
  address's network) is in the operator's allow-list; the check happens in the connector's
  resolver, i.e. *before* any socket is opened, and again for every redirect hop;
- IP literals in URLs skip DNS, so they are checked before the request is made;
- each request has a total time limit and a response-size limit; redirects are followed only
  when asked, at most a few hops, and never from https to http.

The resolver is injectable (:class:`HostResolver`), so tests can map names to loopback test
servers without touching DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult

from matrixrtc.errors import RemoteError

__all__ = [
    "AddressPolicy",
    "BlockedAddressError",
    "FetchError",
    "GuardedHttp",
    "HostResolver",
    "HttpResult",
    "StaticResolver",
    "SystemResolver",
]

log = structlog.get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddressError(RemoteError):
    """A remote-controlled name or URL points at an address we refuse to contact."""


class FetchError(RemoteError):
    """An outbound request failed: connection, timeout, size limit or bad redirect."""


class HostResolver(Protocol):
    """Name resolution used for every outbound connection (injectable for tests)."""

    async def resolve_host(self, host: str, port: int) -> list[tuple[str, int]]:
        """Addresses (ip, port) for ``host``; raise OSError when it does not resolve."""
        ...

    async def resolve_srv(self, name: str) -> list[tuple[str, int]]:
        """SRV targets (host, port) for ``name`` in preference order; [] when none."""
        ...


class SystemResolver:
    """getaddrinfo for addresses, dnspython for SRV records."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout

    async def resolve_host(self, host: str, port: int) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self._timeout
        )
        return [(str(info[4][0]), port) for info in infos]

    async def resolve_srv(self, name: str) -> list[tuple[str, int]]:
        import dns.asyncresolver
        import dns.exception

        resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = self._timeout
        try:
            answer = await resolver.resolve(name, "SRV")
        except dns.exception.DNSException:
            return []
        records = sorted(answer, key=lambda r: (r.priority, -r.weight))
        return [(str(r.target).rstrip("."), int(r.port)) for r in records if str(r.target) != "."]


@dataclass
class StaticResolver:
    """A fixed table, for tests: ``hosts[name]`` lists ``ip`` or ``(ip, port)`` entries (a
    port redirects the connection to another port of that address); ``srv[name]`` lists SRV
    targets. Unknown names do not resolve."""

    hosts: Mapping[str, Sequence[str | tuple[str, int]]] = field(default_factory=dict)
    srv: Mapping[str, Sequence[tuple[str, int]]] = field(default_factory=dict)

    async def resolve_host(self, host: str, port: int) -> list[tuple[str, int]]:
        entries = self.hosts.get(host.lower())
        if not entries:
            raise OSError(f"{host}: name does not resolve")
        return [(e, port) if isinstance(e, str) else (e[0], e[1]) for e in entries]

    async def resolve_srv(self, name: str) -> list[tuple[str, int]]:
        return list(self.srv.get(name.lower(), ()))


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class AddressPolicy:
    """Which destinations may be contacted besides globally routable addresses."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    allow_global: bool = True  # False confines a test to its allow-list

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> AddressPolicy:
        """Entries are host names, IP addresses or CIDR networks."""
        hosts: set[str] = set()
        nets: list[IPNetwork] = []
        for entry in entries:
            e = entry.strip()
            if not e:
                continue
            try:
                nets.append(ipaddress.ip_network(e.strip("[]"), strict=False))
            except ValueError:
                hosts.add(e.lower())
        return cls(frozenset(hosts), tuple(nets))

    def with_hosts(self, hosts: Iterable[str]) -> AddressPolicy:
        return AddressPolicy(
            self.allowed_hosts | {h.lower() for h in hosts},
            self.allowed_networks,
            self.allow_global,
        )

    def address_allowed(self, addr: IPAddress) -> bool:
        a = _unmap(addr)
        if any(a in net for net in self.allowed_networks):
            return True
        if not self.allow_global:
            return False
        return bool(a.is_global) and not (a.is_multicast or a.is_reserved or a.is_unspecified)

    def check(self, host: str, addresses: Iterable[str]) -> None:
        """Raise BlockedAddressError unless every address may be contacted for ``host``."""
        if host.lower().strip("[]") in self.allowed_hosts:
            return
        for text in addresses:
            try:
                addr = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError as exc:
                raise BlockedAddressError(f"{host}: unparsable address") from exc
            if not self.address_allowed(addr):
                raise BlockedAddressError(f"{host} resolves to a non-global address ({addr})")


class _GuardedResolver(AbstractResolver):
    def __init__(self, resolver: HostResolver, policy: AddressPolicy) -> None:
        self._resolver = resolver
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addrs = await self._resolver.resolve_host(host, port)
        # The check runs before aiohttp opens any socket to these addresses.
        self._policy.check(host, (a for a, _ in addrs))
        out: list[ResolveResult] = []
        for addr, p in addrs:
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            out.append(
                {
                    "hostname": host,
                    "host": addr,
                    "port": p,
                    "family": fam,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return out

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class HttpResult:
    """Status, selected headers and the parsed JSON body (None when not JSON)."""

    status: int
    body: Any
    retry_after: str | None = None
    cache_control: str | None = None


def _scrub(text: str, url: str) -> str:
    """Error text without the URL's path and query (they carry tokens and delay ids)."""
    parts = urlsplit(url)
    for secret in (url, parts.path, parts.query):
        if secret and secret != "/":
            text = text.replace(secret, "…")
    return text


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class GuardedHttp:
    """An aiohttp session whose every connection passes the :class:`AddressPolicy`."""

    def __init__(
        self,
        resolver: HostResolver,
        policy: AddressPolicy,
        ssl_context: ssl.SSLContext,
        *,
        limit: int = 100,
    ) -> None:
        self.policy = policy
        self._resolver = resolver
        self._ssl = ssl_context
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=_GuardedResolver(self._resolver, self.policy),
            ssl=self._ssl,
            limit=self._limit,
            ttl_dns_cache=30,
        )
        # No cookies, no proxies from the environment: requests go exactly where we check.
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _check_url(self, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"refusing URL scheme {parts.scheme!r}")
        host = parts.hostname
        if _is_ip_literal(host):
            self.policy.check(host, [host.strip("[]")])
        return parts.scheme

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - one limit for the whole redirect chain
        max_bytes: int = 64 * 1024,
        max_redirects: int = 0,
    ) -> HttpResult:
        """One request with limits; raises BlockedAddressError or FetchError."""
        if self._session is None:
            raise FetchError("HTTP client is closed")
        data = None if json_body is None else json.dumps(json_body).encode()
        hdrs = dict(headers or {})
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(timeout):
                for _hop in range(max_redirects + 1):
                    scheme = self._check_url(url)
                    async with self._session.request(
                        method,
                        url,
                        data=data,
                        headers=hdrs,
                        allow_redirects=False,
                        server_hostname=server_hostname,
                    ) as resp:
                        if resp.status in (301, 302, 303, 307, 308) and max_redirects > 0:
                            location = resp.headers.get("Location", "")
                            nxt = urljoin(url, location)
                            if scheme == "https" and urlsplit(nxt).scheme != "https":
                                raise FetchError("refusing redirect from https to http")
                            url = nxt
                            hdrs.pop("Host", None)
                            server_hostname = None
                            continue
                        length = resp.content_length
                        if length is not None and length > max_bytes:
                            raise FetchError(f"response of {length} bytes exceeds {max_bytes}")
                        raw = await resp.content.read(max_bytes + 1)
                        if len(raw) > max_bytes:
                            raise FetchError(f"response exceeds {max_bytes} bytes")
                        try:
                            body = json.loads(raw) if raw else None
                        except ValueError:
                            body = None
                        return HttpResult(
                            resp.status,
                            body,
                            resp.headers.get("Retry-After"),
                            resp.headers.get("Cache-Control"),
                        )
                raise FetchError("too many redirects")
        except TimeoutError as exc:
            raise FetchError(f"timed out after {timeout} s") from exc
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise FetchError(_scrub(f"{type(exc).__name__}: {exc}", url)[:300]) from exc
