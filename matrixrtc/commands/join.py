"""``python -m matrixrtc join``: join a room's call, print the participants, leave on Ctrl-C.

Credentials never go on the command line: the password comes from ``MATRIXRTC_PASSWORD``,
an access token from ``MATRIXRTC_ACCESS_TOKEN``, or a prompt when stdin is a terminal. A
state directory that already holds this user's session needs neither.

``--output json`` prints one JSON object per line instead of tables (for scripts and tests):
``{"event": "participants", "participants": [...], "ring": ..., "monotonic": ...}``, then
``{"event": "left"}``.

``--ring --leave-when-unanswered`` makes it behave like Element Call's caller: when everyone
rung declined, or nobody joined within ``--ring-lifetime-ms``, it leaves and exits (status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from matrixrtc.agent import AgentConfig, CallAgent, Participant, ParticipantsChanged
from matrixrtc.agent import participants_table as _table
from matrixrtc.discovery import discover_livekit
from matrixrtc.errors import MatrixRTCError
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.model import Dialect, Transport

__all__ = ["register", "run"]

log = structlog.get_logger(__name__)

PASSWORD_ENV = "MATRIXRTC_PASSWORD"
TOKEN_ENV = "MATRIXRTC_ACCESS_TOKEN"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "join",
        help="join a room's MatrixRTC call and print its participants until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--homeserver", required=True, help="homeserver base URL")
    p.add_argument("--user", required=True, help="user id (@u:hs) or localpart")
    p.add_argument("--room", required=True, help="room id or alias (joined if needed)")
    p.add_argument("--intent", default=None, help="m.call.intent, e.g. audio or video")
    p.add_argument("--ring", action="store_true", help="ring the room if we start the call")
    p.add_argument("--ring-lifetime-ms", type=int, default=30_000)
    p.add_argument(
        "--leave-when-unanswered",
        action="store_true",
        help="with --ring: leave (and exit) when everyone declined or nobody joined in time",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="device state (credentials, crypto store); default $XDG_STATE_HOME/matrixrtc/USER",
    )
    p.add_argument(
        "--dialect",
        choices=[d.value for d in Dialect],
        default=Dialect.STATE.value,
        help="membership form: state (Element Call default) or sticky (MSC4143+MSC4354)",
    )
    p.add_argument(
        "--livekit-service-url",
        default=None,
        help="focus to advertise when the homeserver offers none (rtc/transports, .well-known)",
    )
    p.add_argument("--delayed-leave-ms", type=int, default=8_000)
    p.add_argument("--restart-interval-ms", type=int, default=5_000)
    p.add_argument("--output", choices=("table", "json"), default="table")


def default_state_dir(user: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", user.lstrip("@"))
    return Path(base) / "matrixrtc" / safe


def _login(user: str, state_dir: Path) -> Login:
    password = os.environ.get(PASSWORD_ENV) or None
    token = os.environ.get(TOKEN_ENV) or None
    saved = (state_dir / "session.json").exists()
    if password is None and token is None and not saved and sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
    return Login(user, password=password, access_token=token)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except MatrixRTCError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


async def _transports(
    hs: Homeserver, room_id: str, configured: str | None, dialect: Dialect
) -> tuple[Transport, ...]:
    found = await discover_livekit(hs, room_id, configured, dialect)
    if found is None:
        log.warning("join.no_transport", hint="pass --livekit-service-url")
        return ()
    return (found,)


def _participant_json(p: Participant) -> dict[str, Any]:
    return {
        "user_id": p.user_id,
        "device_id": p.device_id,
        "member_id": p.member_id,
        "dialect": p.dialect.value,
        "created_ts": p.created_ts,
        "event_id": p.event_id,
        "transport": p.transport.to_json() if p.transport is not None else None,
        "is_self": p.is_self,
    }


def _print(output: str, change: ParticipantsChanged | None, **extra: Any) -> None:
    if output == "json":
        # "monotonic": when this process saw it (CLOCK_MONOTONIC, one clock for all local
        # processes), so a supervisor can compare agents without its own read delays.
        obj: dict[str, Any] = {"monotonic": time.monotonic(), **extra}
        if change is not None:
            obj.update(
                event="participants",
                participants=[_participant_json(p) for p in change.participants],
                ring=change.ring.value,
            )
        print(json.dumps(obj), flush=True)
        return
    if change is None:
        print(" ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
        return
    print(f"\n{len(change.participants)} in call (ring: {change.ring.value})", flush=True)
    print(_table(change.participants), flush=True)


async def _main(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir or default_state_dir(args.user)
    login = _login(args.user, state_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Homeserver(args.homeserver, login, state_dir=state_dir) as hs:
        room_id = await hs.join_room(args.room)
        config = AgentConfig(
            intent=args.intent,
            transports=await _transports(
                hs, room_id, args.livekit_service_url, Dialect(args.dialect)
            ),
            dialect=Dialect(args.dialect),
            ring=args.ring,
            ring_lifetime_ms=args.ring_lifetime_ms,
            leave_when_ring_unanswered=args.leave_when_unanswered,
            delayed_leave_ms=args.delayed_leave_ms,
            restart_interval_ms=args.restart_interval_ms,
        )
        async with CallAgent(hs, room_id, config) as agent:
            _print(
                args.output,
                None,
                event="ready",
                user_id=hs.user_id,
                device_id=hs.device_id,
                room_id=room_id,
            )
            with agent.changes() as changes:
                stopper = asyncio.create_task(stop.wait())
                try:
                    while not stop.is_set():
                        getter = asyncio.create_task(changes.get())
                        done, _ = await asyncio.wait(
                            {getter, stopper}, return_when=asyncio.FIRST_COMPLETED
                        )
                        if getter in done:
                            _print(args.output, getter.result())
                            if not agent.in_call:  # left by itself (unanswered ring)
                                break
                        else:
                            getter.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await getter
                finally:
                    stopper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await stopper
        _print(args.output, None, event="left")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``join`` alone (``python -m matrixrtc.commands.join``)."""
    from matrixrtc.logging import configure_logging

    parser = argparse.ArgumentParser(prog="python -m matrixrtc.commands.join")
    add_arguments(parser)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging("console", args.log_level)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
