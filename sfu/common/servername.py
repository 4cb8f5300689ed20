"""Matrix server names: the grammar, and where their federation API lives (pure parts).

The grammar follows the Matrix spec appendix (and gomatrixserverlib's
``ParseAndValidateServerName``): ``host[:port]`` where host is an IPv4 literal, a bracketed
IPv6 literal or a DNS name of ASCII letters, digits, ``-`` and ``.`` (at most 255 characters).
We are stricter than Go in two harmless ways: port 0 and an empty host are refused.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["ServerName", "parse_server_name"]

_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


@dataclass(frozen=True, slots=True)
class ServerName:
    """A parsed server name. ``host`` has no brackets; ``port`` is None when not given."""

    raw: str
    host: str
    port: int | None
    is_ip: bool

    @property
    def url_host(self) -> str:
        """The host as written in a URL (IPv6 in brackets)."""
        return f"[{self.host}]" if self.is_ip and ":" in self.host else self.host


def parse_server_name(raw: str) -> ServerName | None:
    """Parse ``raw``; None when it is not a valid Matrix server name."""
    if not raw or len(raw) > 255 + 6:
        return None
    host, port = raw, None
    colon = raw.rfind(":")
    if colon >= 0:
        tail = raw[colon + 1 :]
        if tail.isascii() and tail.isdigit() and len(tail) <= 5:
            port = int(tail)
            host = raw[:colon]
            if not 1 <= port <= 65535:
                return None
    if not host:
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        if "%" in host:  # zone ids are not part of the grammar
            return None
        try:
            addr6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        return ServerName(raw, str(addr6), port, True)
    if len(host) > 255 or not all(c in _DNS_CHARS for c in host):
        return None
    try:
        addr4 = ipaddress.IPv4Address(host)
    except ValueError:
        return ServerName(raw, host, port, False)
    return ServerName(raw, str(addr4), port, True)
