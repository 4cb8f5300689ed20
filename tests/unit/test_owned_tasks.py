"""Owned tasks (matrixrtc.tasks) and every I/O object that runs its tasks through them: a task
that fails is logged when it fails and its error reaches whoever closes the owner. Each test
here fails if that exception were swallowed (the way the bare tasks these replaced lost it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, cast

import pytest
import structlog
from aiortc.mediastreams import MediaStreamTrack
from structlog.testing import capture_logs

from matrixrtc.commands._call_cli import run_until
from matrixrtc.commands.join import _until_stopped
from matrixrtc.errors import RemoteError
from matrixrtc.livekit.connection import LiveKitConnection
from matrixrtc.livekit.transport import LiveKitTransport, OwnDevice
from matrixrtc.matrix import Broadcaster
from matrixrtc.media.published import PublishedTrack
from matrixrtc.media.sinks import CountingSink
from matrixrtc.mesh.fanout import SharedEncoder
from matrixrtc.tasks import OwnedTasks, first_of
from tests.unit.livekit_credentials import CREDS

log = structlog.get_logger("test")


class Boom(Exception):
    pass


async def fail_soon() -> None:
    await asyncio.sleep(0)
    raise Boom("lost?")


class FailingTrack(MediaStreamTrack):
    """A track whose recv() fails (not MediaStreamError: a bug, not the end of the track)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def recv(self) -> Any:
        await asyncio.sleep(0)
        raise Boom(f"{self.kind} source broke")


def failed_events(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if str(e["event"]).endswith("task_failed")]


# -- the mechanism -------------------------------------------------------------------------


async def test_a_failure_is_logged_when_it_happens_and_raised_by_aclose() -> None:
    seen: list[tuple[str, BaseException]] = []
    tasks = OwnedTasks("owner", log, event_prefix="t", on_failure=lambda n, e: seen.append((n, e)))
    with capture_logs() as logs:
        tasks.spawn(fail_soon(), "worker")
        await asyncio.sleep(0.01)
        # Logged and reported at once, while the owner is still open.
        assert [(e["task"], e["log_level"]) for e in failed_events(logs)] == [("worker", "error")]
        assert [n for n, _ in seen] == ["worker"]
        assert [n for n, _ in tasks.failures] == ["worker"]
    with pytest.raises(RemoteError, match="'worker' failed") as info:
        await tasks.aclose()
    assert isinstance(info.value.__cause__, Boom)


async def test_cancel_and_join_return_the_failure_once() -> None:
    tasks = OwnedTasks("owner", log, event_prefix="t")
    tasks.spawn(fail_soon(), "a")
    err = await tasks.join()
    assert err is not None
    assert isinstance(err.__cause__, Boom)
    assert await tasks.cancel() is None  # collected: not raised twice

    tasks.spawn(asyncio.sleep(3600), "sleeper")
    tasks.spawn(fail_soon(), "b")
    await asyncio.sleep(0.01)
    err = await tasks.cancel()
    assert err is not None
    assert "'b'" in str(err)
    assert len(tasks) == 0


async def test_finished_tasks_are_forgotten_and_join_does_not_cancel() -> None:
    tasks = OwnedTasks("owner", log, event_prefix="t")
    done = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.01)
        done.set()

    for i in range(100):
        tasks.spawn(asyncio.sleep(0), f"short-{i}")
    tasks.spawn(work(), "work")
    assert await tasks.join() is None
    assert done.is_set()
    assert len(tasks) == 0


async def test_a_task_spawned_after_aclose_never_runs() -> None:
    tasks = OwnedTasks("owner", log, event_prefix="t")
    await tasks.aclose()
    ran = False

    async def work() -> None:
        nonlocal ran
        ran = True

    t = tasks.spawn(work(), "late")
    await asyncio.sleep(0)
    assert t.cancelled()
    assert not ran
    assert len(tasks) == 0


async def test_an_awaited_task_leaves_its_failure_to_its_awaiters() -> None:
    """A shared lookup (spawn(..., awaited=True)): its requests see the failure; the owner
    neither logs nor keeps it, but still cancels one in flight on close."""
    tasks = OwnedTasks("owner", log, event_prefix="t")
    with capture_logs() as logs:
        lookup = tasks.spawn(fail_soon(), "lookup", awaited=True)
        with pytest.raises(Boom):
            await asyncio.shield(lookup)
    assert failed_events(logs) == []
    assert tasks.failures == []
    slow = tasks.spawn(asyncio.sleep(3600), "slow", awaited=True)
    await tasks.aclose()  # nothing to raise
    assert slow.cancelled()


async def test_first_of_returns_the_first_and_leaves_nothing_running() -> None:
    cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "slow"

    async def fast() -> str:
        return "fast"

    which, fut = await first_of(slow=slow(), fast=fast())
    assert (which, fut.result()) == ("fast", "fast")
    assert cancelled.is_set()  # awaited, not merely asked to stop

    which, fut = await first_of(boom=fail_soon(), slow=slow())
    assert which == "boom"
    with pytest.raises(Boom):
        fut.result()


# -- the owners ------------------------------------------------------------------------------


async def test_shared_encoder_raises_its_loop_failure_on_close() -> None:
    encoder = SharedEncoder(FailingTrack("video"))
    with capture_logs() as logs:
        encoder.start()
        await asyncio.sleep(0.01)
    assert failed_events(logs)
    with pytest.raises(RemoteError, match="video source broke"):
        await encoder.aclose()


async def test_counting_sink_raises_its_drain_failure_on_close() -> None:
    sink = CountingSink(FailingTrack("audio"))
    sink.start()
    await asyncio.sleep(0.01)
    with pytest.raises(RemoteError, match="audio source broke"):
        await sink.aclose()


async def test_published_track_raises_its_pump_failure_on_close() -> None:
    hub = PublishedTrack("video")
    sub = hub.subscribe()
    hub.set_source(FailingTrack("video"))
    await asyncio.sleep(0.01)
    with pytest.raises(RemoteError, match="video source broke"):
        await hub.aclose()
    assert sub.readyState == "ended"  # the subscribers still end


async def test_livekit_connection_raises_a_task_failure_on_close() -> None:
    conn = LiveKitConnection(CREDS, publish=False)
    conn._spawn(fail_soon(), "pump")
    await asyncio.sleep(0.01)
    with pytest.raises(RemoteError, match="'pump' failed"):
        await conn.aclose()
    # After close, SDK callbacks start nothing.
    ran = False

    async def late() -> None:
        nonlocal ran
        ran = True

    conn._spawn(late(), "late")
    await asyncio.sleep(0)
    assert not ran


async def test_livekit_transport_raises_a_supervisor_failure_on_close() -> None:
    async def openid() -> Any:
        raise AssertionError("not used")

    transport = LiveKitTransport(
        room_id="!r:b", own=OwnDevice("@a:b", "D", "m", sticky=False), openid=openid
    )

    def broken() -> float | None:
        raise Boom("supervisor broke")

    transport._next_check_s = broken  # type: ignore[method-assign]
    transport._ensure_supervisor()
    await asyncio.sleep(0.01)
    with pytest.raises(RemoteError, match="supervisor broke"):
        await transport.aclose()


async def test_join_command_stops_and_raises_when_a_stream_fails() -> None:
    class Args:
        output = None

    bus: Broadcaster[object] = Broadcaster()
    sub = bus.subscribe()
    bus.end(Boom("stream broke"))
    stop = asyncio.Event()
    async with asyncio.timeout(5):  # the failure ends the loop; it does not wait for a signal
        with pytest.raises(RemoteError, match="stream broke"):
            await _until_stopped(cast(Any, Args()), [sub], stop, lambda: False)


async def test_run_until_raises_when_what_it_waits_for_fails() -> None:
    async with asyncio.timeout(5):
        with pytest.raises(RemoteError, match="lost"):
            await run_until(duration=None, done=fail_soon(), tick=lambda: None, interval=0.01)


async def test_calltest_runner_raises_when_its_reader_fails() -> None:
    from matrixrtc.calltest.participant import ParticipantConfig
    from matrixrtc.calltest.runner import ParticipantProcess

    class Stdout:
        def __aiter__(self) -> AsyncIterator[bytes]:
            return self._lines()

        async def _lines(self) -> AsyncIterator[bytes]:
            yield json.dumps({"event": "ready"}).encode()
            raise Boom("reader broke")

    class Proc:
        returncode = 0
        stdout = Stdout()

        async def wait(self) -> int:
            return 0

    cfg = cast(ParticipantConfig, type("Cfg", (), {"name": "p"})())
    p = ParticipantProcess(cfg, cast(Any, Proc()))
    with pytest.raises(RemoteError, match="reader broke"):
        await p.stop()
    assert p.ready == {"event": "ready"}


async def test_mesh_engine_raises_a_failure_of_its_own_loops_on_close() -> None:
    from matrixrtc.mesh.engine import MeshEngine
    from matrixrtc.session.mesh_signalling import LocalDevice

    class Sender:
        async def send_to_device(self, *args: Any) -> None:
            raise AssertionError("nothing to send")

    engine = MeshEngine(
        LocalDevice(user_id="@a:b", device_id="D", session_id="s", conf_id="c"), Sender()
    )

    def broken() -> float | None:
        raise Boom("timer broke")

    engine.signalling.next_deadline = broken  # type: ignore[method-assign]
    with capture_logs() as logs:
        engine.start()
        await asyncio.sleep(0.01)
    assert [e["task"] for e in failed_events(logs)] == ["timer"]
    with pytest.raises(RemoteError, match="timer broke"):
        await engine.aclose()


async def test_close_cancels_again_a_task_that_swallowed_its_cancellation() -> None:
    """A task that eats one CancelledError (as Python 3.11's wait_for can, or a library)
    and waits on must not hang its owner's close: it is cancelled again, and logged."""
    tasks = OwnedTasks("owner", log, event_prefix="t", recancel_after_s=0.05)
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # and carries on as if nothing happened
        await asyncio.Event().wait()

    tasks.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        async with asyncio.timeout(5):
            await tasks.aclose()
    assert swallowed.is_set()
    assert len(tasks) == 0
    (resisted,) = [e for e in logs if e["event"] == "t.task_resisted_cancel"]
    assert list(resisted["tasks"]) == ["owner stubborn"]
    assert "stubborn" in resisted["tasks"]["owner stubborn"]
