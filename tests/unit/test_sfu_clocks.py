"""The sfu side's injected monotonic clocks, driven by a fake clock: how long the controller
holds a contradicted removal and a doubt, when the /sync source stops counting as fresh, when
the log sink flushes, and how often the shared rate limiter warns that Redis is down."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from sfu.auth.ratelimit import RedisRateLimiter
from sfu.controller.config import ControllerConfig
from sfu.controller.controller import _AVERTED_S, _DOUBT_S, Controller
from sfu.controller.ghosts import Reason
from sfu.controller.leader import LocalLeadership
from sfu.controller.registry import MemoryRegistry
from sfu.controller.sync_source import STALE_MARGIN_S, SyncSource
from sfu.logsetup import FLUSH_INTERVAL, _Sink
from tests.unit.test_sfu_controller_policy import NOW, FakeSource, finding
from tests.unit.test_sfu_ghosts import ALICE, call_ev, member_ev


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def controller(source: Any, mono: FakeMonotonic) -> Controller:
    return Controller(
        ControllerConfig(livekit_url="ws://x", key="k", secret="s"),
        MemoryRegistry(),
        registry_complete=True,
        source=source,
        leadership=LocalLeadership(),
        clock=lambda: NOW,
        monotonic=mono,
    )


async def test_a_doubt_holds_for_its_period_then_the_source_is_asked_again() -> None:
    mono = FakeMonotonic()
    doubtful = FakeSource(holds=True)
    c = controller(doubtful, mono)
    f = finding(Reason.NO_MEMBERSHIP)
    assert not await c._confirmed_memberless(f)
    mono.now += _DOUBT_S - 0.1
    assert not await c._confirmed_memberless(f)
    assert len(doubtful.asked) == 1  # held: not asked again
    mono.now += 0.2
    doubtful.holds = False  # the sticky membership is gone meanwhile
    assert await c._confirmed_memberless(f)
    assert len(doubtful.asked) == 2


async def test_a_contradicted_removal_is_rechecked_once_its_hold_ends() -> None:
    mono = FakeMonotonic()
    joined = member_ev(ALICE, "join")
    source = FakeSource(holds=False, state=[joined, call_ev(ALICE, "DEV", int(NOW * 1000) - 1000)])
    c = controller(source, mono)
    f = finding(Reason.CALL_ENDED)
    assert not await c._still_bad("lk", f, NOW)
    mono.now += _AVERTED_S - 0.1
    assert not await c._still_bad("lk", f, NOW)
    assert source.state_reads == 1  # held
    mono.now += 0.2
    source.state = [joined, call_ev(ALICE, "DEV", int(NOW * 1000) - 1000, left=True)]
    assert await c._still_bad("lk", f, NOW)  # read again: now the state agrees
    assert source.state_reads == 2


@pytest.fixture
async def homeserver() -> AsyncIterator[tuple[TestServer, asyncio.Event]]:
    """A /sync that answers at once with an empty batch (loopback, this process), and an
    event set by its second request: the source asks again only once it took the first."""
    second = asyncio.Event()
    requests = 0

    async def sync(_request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        if requests >= 2:
            second.set()
        return web.json_response({"next_batch": f"s{requests}"})

    app = web.Application()
    app.router.add_get("/_matrix/client/v3/sync", sync)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server, second
    await server.close()


async def test_sync_source_freshness_follows_the_injected_clock(
    homeserver: tuple[TestServer, asyncio.Event],
) -> None:
    server, second = homeserver
    mono = FakeMonotonic()
    source = SyncSource(str(server.make_url("")), "token", poll_timeout=20.0, monotonic=mono)
    assert not source.fresh()  # no sync yet
    await source.start()
    try:
        async with asyncio.timeout(10):
            await second.wait()
    finally:
        await source.close()
    assert source.syncs >= 1
    assert source.fresh()
    mono.now += 20.0 + STALE_MARGIN_S
    assert source.fresh()  # at the edge
    mono.now += 0.1
    assert not source.fresh()
    assert await source.room("!r:hs") is None  # stale: no answer rather than an old one


def test_log_sink_flushes_on_the_interval_or_at_once_when_urgent() -> None:
    mono = FakeMonotonic()
    out = io.BytesIO()
    sink = _Sink(out, monotonic=mono)
    sink.write("one", urgent=False)
    assert out.getvalue() == b""  # buffered
    mono.now += FLUSH_INTERVAL + 0.01
    sink.write("two", urgent=False)
    assert out.getvalue() == b"one\ntwo\n"  # the interval passed: written together
    sink.write("three", urgent=False)
    assert out.getvalue() == b"one\ntwo\n"
    sink.write("four", urgent=True)
    assert out.getvalue() == b"one\ntwo\nthree\nfour\n"


class _DownRedis:
    async def eval(self, *_args: Any) -> Any:
        raise ConnectionError("redis is down")

    async def aclose(self) -> None:
        return None


async def test_redis_down_is_warned_about_once_a_minute() -> None:
    mono = FakeMonotonic()
    limiter = RedisRateLimiter("redis://unused", 100.0, 100, redis=_DownRedis(), clock=mono)
    with capture_logs() as logs:
        await limiter.acquire("a")
        mono.now += 59.0
        await limiter.acquire("a")
        mono.now += 1.0
        await limiter.acquire("a")
    warned = [e for e in logs if e["event"].startswith("shared rate limit unavailable")]
    assert len(warned) == 2
    assert limiter.fallbacks == 3
