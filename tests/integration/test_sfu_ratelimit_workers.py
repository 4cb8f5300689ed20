"""The per-client rate limit holds across ``serve --workers 2`` when Redis is configured.

Each request comes on a new connection, so SO_REUSEPORT spreads them over both workers. The
same burst of requests is sent to two services, one without Redis (each worker has its own
bucket: the client gets through about twice the burst, which also shows both workers answer)
and one with Redis (one bucket for the client, shared by both workers).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from matrixrtc.devstack import Redis
from matrixrtc.devstack._process import free_tcp_port
from tests.integration.test_sfu_service import Service

BURST = 6
RATE = 0.5  # per second: the burst of 40 requests (< 2 s) earns at most one more token
REQUESTS = 40


def service(run_dir: Path, name: str, **extra: str) -> Service:
    port = free_tcp_port()
    env = {
        **os.environ,
        "LIVEKIT_URL": "ws://127.0.0.1:9",
        "LIVEKIT_KEY": "testkey",
        "LIVEKIT_SECRET": "testsecret-testsecret-testsecret-0123",
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": "full.invalid",
        "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
        "MATRIXRTC_SFU_RATE_LIMIT": str(RATE),
        "MATRIXRTC_SFU_RATE_BURST": str(BURST),
        "MATRIXRTC_SFU_METRICS_BIND": "off",
        "MATRIXRTC_SFU_WORKERS": "2",
        **extra,
    }
    return Service.on_port(run_dir, name, port, env)


async def burst(url: str) -> dict[int, int]:
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection (worker) each time
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one() -> None:
            async with s.post(url + "/get_token", data=b"{}") as r:
                statuses[r.status] = statuses.get(r.status, 0) + 1

        await asyncio.gather(*(one() for _ in range(REQUESTS)))
    return statuses


async def start(service: Service) -> None:
    await service.start()
    await asyncio.sleep(1.0)  # the second worker binds a moment after the first answers


async def test_two_workers_share_one_bucket_through_redis(redis: Redis, run_dir: Path) -> None:
    alone = service(run_dir, "sfu-rl-local")
    shared = service(run_dir, "sfu-rl-redis", LIVEKIT_REDIS_URL=redis.url)
    await asyncio.gather(start(alone), start(shared))
    try:
        local = await burst(alone.url)
        together = await burst(shared.url)
    finally:
        await asyncio.gather(alone.stop(), shared.stop())
    print(f"\nper-worker buckets: {local}; shared through Redis: {together}")
    # 400 M_BAD_JSON = let through; 429 = limited
    assert set(local) <= {400, 429}
    assert set(together) <= {400, 429}
    assert local.get(400, 0) > BURST + 1, "both workers should have answered"
    assert BURST <= together.get(400, 0) <= BURST + 1
