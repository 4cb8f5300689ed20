"""Per-client token buckets: in the process, or shared by every worker through Redis.

``--workers N`` with a per-process bucket lets a client through N times as often as configured.
With ``LIVEKIT_REDIS_URL`` set, :class:`RedisRateLimiter` keeps each client's bucket in Redis
(one Lua script, so concurrent workers cannot both take the last token; Redis's own clock, so
the workers' clocks do not matter). When Redis does not answer, each worker falls back to its
own bucket (logged at most once a minute) rather than refusing everyone or letting everyone in.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Protocol

import structlog

__all__ = ["ClientLimiter", "RateLimiter", "RedisRateLimiter"]

log = structlog.get_logger(__name__)


class ClientLimiter(Protocol):
    async def acquire(self, client: str) -> float:
        """0 when the request may proceed, else the seconds until it would."""
        ...

    async def close(self) -> None: ...


class RateLimiter:
    """``rate`` requests per second with bursts of ``burst``; ``rate <= 0`` disables it."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, client: str) -> float:
        """0 when the request may proceed, else the seconds until it would."""
        if self._rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait

    async def acquire(self, client: str) -> float:
        return self.check(client)

    async def close(self) -> None:
        return None


# KEYS[1] the client's bucket; ARGV rate, burst. Returns the wait in seconds (a string).
_TAKE: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(v[1]) or burst
local last = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""
KEY_PREFIX: Final = "matrixrtc:sfu:ratelimit:"


class RedisRateLimiter:
    """The same buckets as :class:`RateLimiter`, kept in Redis for every worker."""

    def __init__(
        self,
        url: str,
        rate: float,
        burst: int,
        *,
        redis: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._local = RateLimiter(rate, burst, clock=clock)
        if redis is None:
            import redis.asyncio as aioredis

            redis = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self._redis = redis
        self._last_error_log = -1e9
        self.fallbacks = 0

    async def acquire(self, client: str) -> float:
        if self._rate <= 0:
            return 0.0
        digest = hashlib.blake2b(client.encode("utf-8", "replace"), digest_size=12).hexdigest()
        try:
            raw = await self._redis.eval(_TAKE, 1, KEY_PREFIX + digest, self._rate, self._burst)
            return float(raw)
        except Exception as exc:  # Redis down: each worker limits on its own meanwhile
            self.fallbacks += 1
            now = self._clock()
            if now - self._last_error_log >= 60:
                self._last_error_log = now
                log.warning(
                    "shared rate limit unavailable, limiting per worker",
                    reason=str(exc)[:200],
                )
            return self._local.check(client)

    async def close(self) -> None:
        await self._redis.aclose()
