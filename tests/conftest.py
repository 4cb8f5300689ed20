"""Shared fixtures: the real local stack, started lazily once per session.

Integration and browser tests run only inside the private network namespace
(``./scripts/in-netns``, which sets MATRIXRTC_IN_NETNS=1) or with MATRIXRTC_NO_NETNS=1;
otherwise they are skipped with a message saying how to run them. At the end of the
session no process started by ``matrixrtc.devstack`` may still be alive.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

from matrixrtc.devstack import (
    Chromium,
    Coturn,
    LiveKit,
    Redis,
    Synapse,
    UserCreds,
    leftover_processes,
    new_run_dir,
)

# Property tests check what a parser does with an input, not how fast: hypothesis's 200 ms
# per-example deadline and its too-slow health check only turn a loaded machine into a red run.
settings.register_profile("matrixrtc", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("matrixrtc")

UserFactory = Callable[..., Awaitable[UserCreds]]

_TESTS_DIR = Path(__file__).resolve().parent
_NEEDS_NETNS = {"integration": _TESTS_DIR / "integration", "browser": _TESTS_DIR / "browser"}
_NETNS_HINT = (
    "needs the private network namespace: run "
    "`./scripts/in-netns .venv/bin/pytest -q tests/...` "
    "(or set MATRIXRTC_NO_NETNS=1 to run in the current namespace)"
)


def _in_netns() -> bool:
    return (
        os.environ.get("MATRIXRTC_IN_NETNS") == "1" or os.environ.get("MATRIXRTC_NO_NETNS") == "1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by directory, and skip stack tests outside the private namespace."""
    skip = pytest.mark.skip(reason=_NETNS_HINT)
    inside = _in_netns()
    for item in items:
        path = item.path.resolve()
        for marker, directory in _NEEDS_NETNS.items():
            if path.is_relative_to(directory):
                item.add_marker(getattr(pytest.mark, marker))
        if not inside and any(item.get_closest_marker(m) for m in _NEEDS_NETNS):
            item.add_marker(skip)


# trylast: after pytest's own sessionfinish, which tears down session fixtures (that matters
# when the run is interrupted; normally they are gone after the last test).
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session loudly if any devstack process outlived its fixture or test."""
    left = leftover_processes()
    if not left:
        return
    for pgid in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    names = ", ".join(f"{name} (pgid {pgid})" for pgid, name in sorted(left.items()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = f"devstack processes still running after the session (now killed): {names}"
    if reporter is not None:
        reporter.write_sep("!", msg, red=True, bold=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def run_dir() -> Path:
    """This session's run directory under /tmp/matrixrtc-runs/ (configs, data, logs)."""
    return new_run_dir(prefix="test")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def synapse(run_dir: Path) -> AsyncIterator[Synapse]:
    """A Synapse homeserver shared by the session (no MatrixRTC transport configured)."""
    async with Synapse(run_dir) as hs:
        yield hs


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def livekit(run_dir: Path) -> AsyncIterator[LiveKit]:
    """A LiveKit server shared by the session (auto_create off, no webhooks)."""
    async with LiveKit(run_dir) as lk:
        yield lk


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def redis(run_dir: Path) -> AsyncIterator[Redis]:
    """A redis-server shared by the session."""
    async with Redis(run_dir) as r:
        yield r


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def coturn(run_dir: Path) -> AsyncIterator[Coturn]:
    """A coturn TURN server shared by the session."""
    async with Coturn(run_dir) as t:
        yield t


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium(run_dir: Path) -> AsyncIterator[Chromium]:
    """A headless Chromium shared by the session; attach with playwright-core's
    ``chromium.connectOverCDP(chromium.devtools_url)``."""
    async with Chromium(run_dir) as browser:
        yield browser


_user_counter = itertools.count(1)


@pytest.fixture
def user_factory(synapse: Synapse) -> UserFactory:
    """``await user_factory("alice")`` registers a fresh user ``alice-<n>-<hex>`` on ``synapse``.

    Session fixtures share one homeserver, so fixed names would collide between tests.
    """

    async def make(prefix: str = "user") -> UserCreds:
        name = f"{prefix}-{next(_user_counter)}-{secrets.token_hex(2)}"
        return await synapse.register(name)

    return make
