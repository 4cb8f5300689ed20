"""Serving an aiohttp application to the open internet: slow and greedy clients.

aiohttp has no header read timeout: a client that trickles its request line and headers holds
a connection (and a file descriptor) for as long as it likes, and a few thousand of them take
a service started with the default soft open-file limit (1 024) off the air. This module puts a
thin protocol in front of aiohttp's own (:class:`ConnectionGuard`) that

- gives every request ``header_timeout`` seconds from its first byte (or from the connection's
  start) until its headers are complete, then answers 408 and closes;
- refuses (503, closed at once) a connection from an address that already holds
  ``max_per_client`` connections, and any connection beyond ``max_total`` (kept below the
  open-file limit so ``accept`` never fails with EMFILE);
- leaves idle keep-alive connections to aiohttp's ``keepalive_timeout`` (``idle_timeout``).

The request body's deadline is the handler's (``asyncio.timeout`` around ``request.read()``),
since only the handler knows when it reads. :func:`raise_nofile_limit` raises the soft
RLIMIT_NOFILE to the hard one, as Go's runtime does for lk-jwt-service. Each refusal is logged
at most once per address per minute.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import structlog
from aiohttp import web

from sfu.common import metrics

__all__ = ["ConnectionGuard", "ConnectionLimits", "LogThrottle", "raise_nofile_limit", "serve"]

log = structlog.get_logger(__name__)

_TIMEOUT_408: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)
_REFUSED_503: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
    b"Content-Length: 0\r\n\r\n"
)
# File descriptors kept free for everything that is not an inbound connection (outbound HTTP,
# Redis, logs, the listening sockets).
FD_RESERVE: Final = 64
LINGER_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection deadlines (seconds) and connection caps (0 = no cap)."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_per_client: int = 64
    max_total: int = 0


class LogThrottle:
    """Whether to log an event for a key: once per ``interval`` seconds per key (bounded)."""

    def __init__(
        self,
        interval: float = 60.0,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._max = max_keys
        self._clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self.suppressed = 0

    def allow(self, key: str) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self.suppressed += 1
            return False
        self._last.pop(key, None)
        self._last[key] = now
        if len(self._last) > self._max:
            self._last.popitem(last=False)
        return True


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        host = str(peer[0])
        return host.removeprefix("::ffff:")
    return "?"


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol behind the guard: admission, header deadline, accounting."""

    __slots__ = ("_addr", "_busy", "_guard", "_inner", "_pending", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._addr = ""
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        addr = _peer(transport)
        if not self._guard._admit(addr):
            transport.write(_REFUSED_503)
            transport.close()
            return
        self._addr = addr
        self._transport = transport
        self._guard._conns[transport] = self
        self._arm()
        self._inner.connection_made(transport)

    def _arm(self) -> None:
        if self._timer is None and self._guard.limits.header_timeout > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._guard.limits.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or self._busy:
            return
        self._guard.header_timeouts += 1
        metrics.HEADER_TIMEOUTS.inc()
        if self._guard.throttle.allow("header:" + self._addr):
            log.warning(
                "connection closed: request headers not received in time",
                client=self._addr,
                header_timeout=self._guard.limits.header_timeout,
            )
        transport.write(_TIMEOUT_408)
        transport.close()

    def request_started(self) -> None:
        self._busy = True
        self._pending = False
        self._disarm()

    def request_finished(self) -> None:
        self._busy = False
        if self._pending:  # a pipelined request began while this one was handled
            self._pending = False
            self._arm()

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        if self._busy:
            self._pending = True
        else:
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._transport is None:
            return None
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        transport = self._transport
        if transport is None:
            return
        self._disarm()
        self._transport = None
        self._guard._release(transport, self._addr)
        self._inner.connection_lost(exc)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConnectionGuard:
    """Connection admission and header deadlines for one listening server."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.throttle = LogThrottle()
        self._per_addr: dict[str, int] = {}
        self._conns: dict[asyncio.BaseTransport, _Guarded] = {}
        self.refused = 0
        self.header_timeouts = 0

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` wrapping aiohttp's."""

        def make() -> asyncio.Protocol:
            return _Guarded(self, inner())

        return make

    def _admit(self, addr: str) -> bool:
        limits = self.limits
        reason = ""
        cap = ""
        if limits.max_total and len(self._conns) >= limits.max_total:
            reason, cap = "too many connections", "total"
        elif limits.max_per_client and self._per_addr.get(addr, 0) >= limits.max_per_client:
            reason, cap = "too many connections from this address", "per_client"
        if reason:
            self.refused += 1
            metrics.CONNECTIONS_REFUSED.labels(cap).inc()
            if self.throttle.allow("refused:" + addr):
                log.warning(
                    "connection refused",
                    client=addr,
                    reason=reason,
                    max_per_client=limits.max_per_client,
                    max_total=limits.max_total,
                )
            return False
        self._per_addr[addr] = self._per_addr.get(addr, 0) + 1
        return True

    def _release(self, transport: asyncio.BaseTransport, addr: str) -> None:
        self._conns.pop(transport, None)
        left = self._per_addr.get(addr, 0) - 1
        if left > 0:
            self._per_addr[addr] = left
        else:
            self._per_addr.pop(addr, None)

    @web.middleware
    async def middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Marks the connection busy while a request (whose headers are in) is handled."""
        conn = self._conns.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        conn.request_started()
        try:
            return await handler(request)
        finally:
            conn.request_finished()


async def serve(
    app: web.Application,
    *,
    host: str | None,
    port: int,
    limits: ConnectionLimits,
    reuse_port: bool = False,
    shutdown_timeout: float = 5.0,
    ready: Callable[[ConnectionGuard], None] | None = None,
    side: tuple[web.Application, str | None, int] | None = None,
) -> None:
    """Run ``app`` behind a :class:`ConnectionGuard` until SIGINT or SIGTERM.

    ``side`` is a second application on its own address (the metrics listener): started after
    ``app``; when its address cannot be bound this is logged and ``app`` is served anyway.
    """
    loop = asyncio.get_running_loop()
    guard = ConnectionGuard(limits)
    app.middlewares.insert(0, guard.middleware)
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=limits.idle_timeout,
        # After an answer given before the whole body arrived (408, 413, 429), aiohttp reads
        # the rest for this long so the client sees the answer; its default (10 s) would let
        # a slow body hold the connection well past its deadline.
        lingering_time=LINGER_S,
        shutdown_timeout=shutdown_timeout,
        handle_signals=False,
    )
    await runner.setup()
    try:
        assert runner.server is not None
        server = await loop.create_server(
            guard.factory(runner.server),
            host=host,
            port=port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        side_runner = await _start_side(side, limits) if side is not None else None
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready(guard)
        try:
            await stop.wait()
        finally:
            server.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if side_runner is not None:
                await side_runner.cleanup()
    finally:
        await runner.cleanup()


async def _start_side(
    side: tuple[web.Application, str | None, int], limits: ConnectionLimits
) -> web.AppRunner | None:
    app, host, port = side
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.idle_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        log.error("metrics listener not started", address=f"{host or ''}:{port}", reason=str(exc))
        await runner.cleanup()
        return None
    log.info("metrics listener", address=f"{host or ''}:{port}")
    return runner
