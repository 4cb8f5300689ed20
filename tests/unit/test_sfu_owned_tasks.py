"""The operator side (``sfu``) owns its tasks through :mod:`matrixrtc.tasks` (the declared shared
module): a task that fails is logged when it fails, and its error is raised by the owner's
``close()`` once everything else is closed. Each test fails if its owner swallowed the
exception (or only reported it at close, as the bare tasks these replaced did)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from matrixrtc.errors import RemoteError
from sfu import logsetup
from sfu.controller.bus import WebhookBus
from sfu.controller.config import ControllerConfig
from sfu.controller.controller import Controller
from sfu.controller.csapi import ActionResult, DelayAction
from sfu.controller.delayed_leave import DelayedLeaveManager
from sfu.controller.leader import RedisLeadership
from sfu.controller.registry import MemoryRegistry
from sfu.controller.store import JobParams, MemoryStore
from sfu.controller.sync_source import SyncSource
from tests.unit.test_sfu_controller_policy import FakeSource

ROOT = Path(__file__).resolve().parents[2]


class Boom(Exception):
    pass


def failed(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [str(e["task"]) for e in logs if str(e["event"]).endswith("task_failed")]


async def until_failed(logs: list[MutableMapping[str, Any]]) -> list[str]:
    async with asyncio.timeout(5):
        while not failed(logs):  # noqa: ASYNC110 (the log line is what is under test)
            await asyncio.sleep(0.005)
    return failed(logs)


def clock_failing_after(calls: int) -> Any:
    n = 0

    def clock() -> float:
        nonlocal n
        n += 1
        if n > calls:
            raise Boom("clock broke")
        return 1000.0 + n

    return clock


# -- controller ------------------------------------------------------------------------------


class Follower:
    """Never the leader (so a cycle asks nothing of LiveKit); remembers being closed."""

    id = "follower"
    closed = False

    def is_leader(self) -> bool:
        return False

    async def start(self) -> None: ...

    async def close(self) -> None:
        self.closed = True

    async def claim(self, action: str) -> bool:
        return False


class BrokenSource(FakeSource):
    async def wait_changed(self, within: float) -> bool:
        raise Boom("source broke")


async def test_controller_logs_a_dead_cycle_loop_and_raises_it_after_closing_the_rest() -> None:
    lead = Follower()
    c = Controller(
        ControllerConfig(livekit_url="ws://127.0.0.1:1", key="k", secret="s"),
        MemoryRegistry(),
        registry_complete=True,
        source=BrokenSource(holds=True),
        leadership=lead,
    )
    with capture_logs() as logs:
        await c.start()
        assert await until_failed(logs) == ["cycles"]  # while the controller still runs
    with pytest.raises(RemoteError, match="source broke"):
        await c.close()
    assert lead.closed  # the failure did not stop the rest of the close


# -- leader lock -----------------------------------------------------------------------------


class FakeRedis:
    def __init__(self) -> None:
        self.closed = False

    async def ping(self) -> bool:
        return True

    async def set(self, *args: Any, **kwargs: Any) -> bool:
        return True

    async def eval(self, *args: Any) -> int:
        raise ConnectionError("redis gone")

    async def aclose(self) -> None:
        self.closed = True


async def test_leadership_logs_a_dead_renewal_loop_and_raises_it_on_close() -> None:
    # Start-up takes the lock (two clock reads); the first renewal finds Redis gone and
    # the loop's own handler then trips over the broken clock: that must not pass unseen.
    lead = RedisLeadership("redis://127.0.0.1:1", ttl=0.03, clock=clock_failing_after(2))
    redis = FakeRedis()
    lead._redis = redis  # type: ignore[assignment]
    with capture_logs() as logs:
        await lead.start()
        assert await until_failed(logs) == ["renew"]
    with pytest.raises(RemoteError, match="clock broke"):
        await lead.close()
    assert redis.closed


# -- /sync reader ----------------------------------------------------------------------------


async def test_sync_source_logs_a_dead_sync_loop_and_raises_it_on_close() -> None:
    # Nothing listens on port 1: every sync fails, and the failure handler reads the clock.
    source = SyncSource("http://127.0.0.1:1", "token", clock=clock_failing_after(0))
    with capture_logs() as logs:
        await source.start()
        assert await until_failed(logs) == ["sync"]
    with pytest.raises(RemoteError, match="clock broke"):
        await source.close()


# -- webhook bus -----------------------------------------------------------------------------


async def test_webhook_bus_logs_a_dead_listener_and_raises_it_on_close() -> None:
    bus = WebhookBus("redis://127.0.0.1:1", lambda *_: None)
    redis = FakeRedis()
    bus._redis = redis  # type: ignore[assignment]

    async def listen() -> None:
        bus._subscribed.set()
        await asyncio.sleep(0)
        raise Boom("listener broke")

    bus._listen = listen  # type: ignore[method-assign]
    with capture_logs() as logs:
        await bus.start()
        assert await until_failed(logs) == ["listen"]
    with pytest.raises(RemoteError, match="listener broke"):
        await bus.close()
    assert redis.closed


# -- delayed-leave jobs ----------------------------------------------------------------------


class Present:
    async def participant_present(self, room: str, identity: str) -> bool:
        return True


class BrokenCsApi:
    """Resolving the member's homeserver fails with a bug (not a lookup failure)."""

    async def base_url(self, server_name: str) -> str | None:
        raise Boom("resolver broke")

    async def act(self, base: str, delay_id: str, action: DelayAction) -> Any:
        return type("Outcome", (), {"result": ActionResult.OK, "retry_after": None})()


async def test_delayed_leave_logs_a_failed_job_and_raises_it_on_close() -> None:
    jobs = DelayedLeaveManager(Present(), BrokenCsApi(), MemoryStore(), check_interval=0)  # type: ignore[arg-type]
    params = JobParams("hs", "delay-1", 60_000, "room-1", "@a:hs:DEV")
    with capture_logs() as logs:
        await jobs.add(params)  # found connected at once, so it restarts the delay: fails
        assert await until_failed(logs) == ["job room-1 @a:hs:DEV"]
    assert jobs.jobs() == {}  # the failed job is gone from the table
    with pytest.raises(RemoteError, match="resolver broke"):
        await jobs.close()


# -- log flusher -----------------------------------------------------------------------------


class BrokenSink:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        if self.flushes == 1:
            raise Boom("sink broke")


async def test_log_flusher_logs_a_dead_loop_and_raises_it_when_the_app_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink = BrokenSink()
    monkeypatch.setattr(logsetup, "_sink", sink)
    monkeypatch.setattr(logsetup, "FLUSH_INTERVAL", 0.001)
    lifetime: AsyncIterator[None] = logsetup.flusher(object())
    with capture_logs() as logs:
        await anext(lifetime)
        assert await until_failed(logs) == ["flush"]
    with pytest.raises(RemoteError, match="sink broke"):
        await anext(lifetime)
    assert sink.flushes == 2  # the last flush still ran


# -- the one mechanism -----------------------------------------------------------------------


def test_only_the_shared_module_starts_tasks() -> None:
    """Every task in matrixrtc and sfu is started through matrixrtc.tasks."""
    starts = ("create_task(", "ensure_future(")
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("matrixrtc", "sfu")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "matrixrtc" / "tasks.py" and any(s in path.read_text() for s in starts)
    ]
    assert offenders == []
