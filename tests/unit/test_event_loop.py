"""matrixrtc.event_loop: which loop our media processes run on, and the switch back."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from matrixrtc import event_loop
from matrixrtc.errors import ConfigError


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def test_runs_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.loop_name() == "uvloop"
    assert event_loop.run(_loop_module()) == "uvloop"


@pytest.mark.parametrize("value", ["asyncio", " ASYNCIO "])
def test_environment_selects_asyncio(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(event_loop.ENV, value)
    assert event_loop.loop_name() == "asyncio"
    assert event_loop.run(_loop_module()) == "asyncio"


def test_empty_setting_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "")
    assert event_loop.run(_loop_module()) == "uvloop"


def test_unknown_loop_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "trio")
    coro = _loop_module()
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CREATED
    with pytest.raises(ConfigError, match="MATRIXRTC_EVENT_LOOP must be"):
        event_loop.run(coro)
    # closed, not left to warn as never awaited
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_without_uvloop_installed_asyncio_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delenv(event_loop.ENV, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails as if not installed
    assert event_loop.loop_name() == "asyncio"
    assert event_loop.run(_loop_module()) == "asyncio"


def test_result_and_exceptions_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)

    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("x")

    with pytest.raises(KeyError):
        event_loop.run(fails())


async def test_a_call_test_with_a_bad_setting_fails_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from matrixrtc.calltest.runner import CallTestConfig, run_call_test

    monkeypatch.setenv(event_loop.ENV, "trio")
    said: list[str] = []
    with pytest.raises(ConfigError, match="MATRIXRTC_EVENT_LOOP must be"):
        await run_call_test(CallTestConfig(participants=2, run_dir=tmp_path), progress=said.append)
    assert said == []  # no homeserver was started (the first thing it reports)
