"""What the media commands (``play``, ``record``) share: joining a call from the command line,
stopping on Ctrl-C/SIGTERM or after ``--duration``, and printing progress.

Credentials as for ``join``: ``MATRIXRTC_PASSWORD`` or ``MATRIXRTC_ACCESS_TOKEN`` (never on the
command line), else a prompt on a terminal; ``--state-dir`` keeps the device between runs.
``--output json`` prints one JSON object per line (``{"event": ...}``) for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from matrixrtc.agent import DIALECT_CHOICES
from matrixrtc.call import Call, CallOptions
from matrixrtc.commands.join import _login, default_state_dir
from matrixrtc.model import Dialect
from matrixrtc.tasks import OwnedTasks

__all__ = ["Console", "add_call_arguments", "make_call", "run_until"]


log = structlog.get_logger(__name__)


def add_call_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--homeserver", required=True, help="homeserver base URL")
    p.add_argument("--user", required=True, help="user id (@u:hs) or localpart")
    p.add_argument("--room", required=True, help="room id or alias (joined if needed)")
    p.add_argument("--state-dir", type=Path, default=None, help="device state directory")
    p.add_argument(
        "--transport",
        choices=("auto", "mesh", "sfu"),
        default="auto",
        help="auto: mesh for small calls, the room's LiveKit SFU otherwise (default)",
    )
    p.add_argument("--dialect", choices=DIALECT_CHOICES, default=Dialect.STATE.value)
    p.add_argument(
        "--sfu-url", default=None, help="LiveKit authorization service when the room names none"
    )
    p.add_argument(
        "--mesh-host",
        action="append",
        default=None,
        metavar="ADDR",
        help="host candidate address for the mesh (repeatable; default: every non-loopback)",
    )
    p.add_argument(
        "--allow-plaintext-keys",
        action="store_true",
        help="E2EE keys in an unencrypted room (test rooms only)",
    )
    p.add_argument("--duration", type=float, default=None, help="leave after this many seconds")
    p.add_argument("--output", choices=("console", "json"), default="console")


def make_call(args: argparse.Namespace, **kwargs: Any) -> Call:
    state_dir: Path = args.state_dir or default_state_dir(args.user)
    login = _login(args.user, state_dir)
    return Call(
        args.room,
        homeserver=args.homeserver,
        user=login.user,
        password=login.password,
        access_token=login.access_token,
        state_dir=state_dir,
        transport=args.transport,
        dialect=args.dialect,
        sfu_url=args.sfu_url,
        options=CallOptions(
            mesh_host_addresses=tuple(args.mesh_host) if args.mesh_host else None,
            turn_from_homeserver=True,
            allow_plaintext_keys=args.allow_plaintext_keys,
        ),
        **kwargs,
    )


class Console:
    """Progress lines and the final report: plain text, or JSON lines with ``--output json``."""

    def __init__(self, output: str) -> None:
        self.json = output == "json"
        self.started = time.monotonic()

    def event(self, event: str, text: str, **fields: Any) -> None:
        if self.json:
            print(json.dumps({"event": event, **fields}, default=str), flush=True)
        else:
            print(text, flush=True)

    def error(self, text: str) -> None:
        if self.json:
            print(json.dumps({"event": "error", "error": text}), flush=True)
        print(f"error: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_until(
    *,
    duration: float | None,
    done: Awaitable[Any] | None,
    tick: Callable[[], None],
    interval: float = 2.0,
) -> str:
    """Call ``tick`` every ``interval`` until a signal, ``duration`` or ``done`` completes;
    returns why it stopped: "signal", "duration" or "done"."""
    stop = asyncio.Event()
    deadline = None if duration is None else time.monotonic() + duration
    # Both owned: a ``done`` that fails is logged at once and raised here, never dropped.
    tasks = OwnedTasks("run-until", log, event_prefix="cli")
    waiters: set[asyncio.Future[Any]] = {tasks.spawn(stop.wait(), "signal")}
    finished = None if done is None else tasks.spawn(_wait(done), "done")
    if finished is not None:
        waiters.add(finished)
    with _signals(stop):
        try:
            while True:
                wait = interval
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    return "signal"
                if finished is not None and finished.done():
                    return "done"
                if deadline is not None and time.monotonic() >= deadline:
                    return "duration"
                tick()
        finally:
            await tasks.aclose()


async def _wait(aw: Awaitable[Any]) -> None:
    await aw
