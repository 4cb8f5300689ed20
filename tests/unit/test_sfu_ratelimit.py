"""Rate limiters: the process-local bucket, and the Redis one falling back to it."""

from __future__ import annotations

from typing import Any

from sfu.auth.ratelimit import RateLimiter, RedisRateLimiter


def test_local_bucket_burst_then_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a") == 0.5
    assert limiter.check("b") == 0.0  # per client
    now[0] = 0.5
    assert limiter.check("a") == 0.0


class _DownRedis:
    def __init__(self) -> None:
        self.calls = 0

    async def eval(self, *_args: Any) -> Any:
        self.calls += 1
        raise ConnectionError("redis is down")

    async def aclose(self) -> None:
        return None


async def test_redis_limiter_falls_back_to_a_local_bucket() -> None:
    down = _DownRedis()
    limiter = RedisRateLimiter("redis://unused", 1.0, 2, redis=down)
    waits = [await limiter.acquire("c") for _ in range(3)]
    assert waits[:2] == [0.0, 0.0]
    assert waits[2] > 0
    assert down.calls == 3
    assert limiter.fallbacks == 3
    off = RedisRateLimiter("redis://unused", 0.0, 2, redis=down)
    assert await off.acquire("c") == 0.0
    assert down.calls == 3  # disabled: Redis is not asked
    await limiter.close()
