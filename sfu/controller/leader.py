"""One acting controller among replicas, and every action taken at most once.

:class:`RedisLeadership` holds the key ``matrixrtc-sfu:controller:leader`` (value: this
instance's id) with an expiry of ``ttl`` seconds, renewed every ``ttl / 3``. Only the holder
acts, and only while its last successful renewal is younger than ``ttl - margin`` by its own
monotonic clock, so a leader that stalls (SIGSTOP, a long GC pause, a partition) stops
acting before anyone else can take over. A killed leader's key expires after ``ttl``; the
others try every ``ttl / 3``, so one takes over within ``ttl * 4 / 3`` (≈ 6.7 s at the
default 5 s).

Every action is also *claimed* before it is taken (``SET matrixrtc-sfu:controller:done:<key>
NX``, kept an hour): even two instances that both believe they lead cannot remove the same
LiveKit session or close the same room twice.

:class:`LocalLeadership` is the single-process variant (no Redis): always the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import structlog

from matrixrtc.tasks import OwnedTasks
from sfu.common import metrics

__all__ = ["Leadership", "LocalLeadership", "RedisLeadership"]

log = structlog.get_logger(__name__)

LEADER_KEY = "matrixrtc-sfu:controller:leader"
DONE_PREFIX = "matrixrtc-sfu:controller:done:"
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leadership(Protocol):
    id: str

    def is_leader(self) -> bool: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def claim(self, action: str) -> bool:
        """True exactly once per ``action`` across every instance."""
        ...


class LocalLeadership:
    """One process, no Redis: always the leader; claims remembered in memory."""

    def __init__(self) -> None:
        self.id = instance_id()
        self._done: set[str] = set()

    def is_leader(self) -> bool:
        return True

    async def start(self) -> None:
        metrics.CONTROLLER_LEADER.set(1)

    async def close(self) -> None:
        metrics.CONTROLLER_LEADER.set(0)

    async def claim(self, action: str) -> bool:
        if action in self._done:
            return False
        if len(self._done) > 100_000:
            self._done.clear()
        self._done.add(action)
        return True


class RedisLeadership:
    """A Redis lock with expiry; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 5.0,
        margin: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        import redis.asyncio as aioredis

        self.id = instance_id()
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._ttl = ttl
        self._margin = min(margin, ttl / 4)
        self._clock = clock
        self._valid_until = 0.0
        self._leading = False
        self._tasks = OwnedTasks("leadership", log, event_prefix="controller.leadership")
        self._on_change = on_change

    def is_leader(self) -> bool:
        return self._leading and self._clock() < self._valid_until

    async def start(self) -> None:
        await self._redis.ping()
        await self._attempt()
        self._tasks.spawn(self._loop(), "renew")

    async def close(self) -> None:
        """Stop renewing, release the lock, disconnect; a failure of the renewal loop (logged
        when it happened) is raised once the lock is released."""
        try:
            await self._tasks.aclose()
        finally:
            if self._leading:
                with contextlib.suppress(Exception):
                    await self._redis.eval(_RELEASE, 1, LEADER_KEY, self.id)
                self._set_leading(False)
            await self._redis.aclose()

    async def claim(self, action: str) -> bool:
        ok = await self._redis.set(DONE_PREFIX + action, self.id, nx=True, ex=3600)
        return bool(ok)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self._attempt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leader lock unavailable", reason=str(exc)[:200])
                if self._leading and self._clock() >= self._valid_until:
                    self._set_leading(False)

    async def _attempt(self) -> None:
        started = self._clock()
        ttl_ms = int(self._ttl * 1000)
        if self._leading:
            renewed = await self._redis.eval(_RENEW, 1, LEADER_KEY, self.id, str(ttl_ms))
            got = bool(renewed)
        else:
            got = bool(await self._redis.set(LEADER_KEY, self.id, nx=True, px=ttl_ms))
        if got:
            self._valid_until = started + self._ttl - self._margin
        self._set_leading(got)

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        metrics.CONTROLLER_LEADER.set(1 if leading else 0)
        if leading:
            log.info("controller leadership acquired", instance=self.id)
        else:
            log.warning("controller leadership lost", instance=self.id)
        if self._on_change is not None:
            self._on_change(leading)
