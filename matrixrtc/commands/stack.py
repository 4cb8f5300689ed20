"""``python -m matrixrtc stack up``: a local Synapse + LiveKit in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import structlog

from matrixrtc.devstack import new_run_dir
from matrixrtc.devstack.stack import LocalStack, local_stack
from matrixrtc.errors import MatrixRTCError

__all__ = ["register"]

log = structlog.get_logger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "stack",
        help="run the local stack (Synapse + LiveKit)",
        description="Run the real local stack: Synapse and LiveKit on free loopback ports.",
    )
    sub = parser.add_subparsers(dest="stack_command", metavar="SUBCOMMAND", required=True)
    up = sub.add_parser(
        "up",
        help="start Synapse + LiveKit in the foreground until Ctrl-C/SIGTERM",
        description=(
            "Start Synapse and LiveKit in the foreground, print their URLs, the LiveKit API "
            "key/secret and two ready user logins, and stop both cleanly on Ctrl-C or SIGTERM. "
            "Everything binds to 127.0.0.1; configs, data and logs go to the run directory."
        ),
    )
    up.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="directory for configs, data and logs (default: a new one under /tmp/matrixrtc-runs)",
    )
    up.add_argument(
        "--user",
        dest="users",
        action="append",
        default=None,
        metavar="NAME",
        help="register this user (repeatable; default: alice and bob)",
    )
    up.add_argument(
        "--livekit-service-url",
        default=None,
        help="advertise this MatrixRTC authorization service in Synapse's rtc/transports",
    )
    up.add_argument(
        "--json", action="store_true", help="print the stack description as one JSON object"
    )
    up.set_defaults(func=_run_up)


def describe(stack: LocalStack) -> dict[str, Any]:
    """Everything a client needs to use the stack (includes secrets: it is a dev stack)."""
    return {
        "run_dir": str(stack.run_dir),
        "synapse": {
            "base_url": stack.synapse.base_url,
            "server_name": stack.synapse.server_name,
            "log": str(stack.synapse.log_path),
            "pid": stack.synapse.pid,
            "startup_seconds": stack.synapse.startup_seconds,
        },
        "livekit": {
            "url": stack.livekit.url,
            "http_url": stack.livekit.http_url,
            "api_key": stack.livekit.api_key,
            "api_secret": stack.livekit.api_secret,
            "log": str(stack.livekit.log_path),
            "pid": stack.livekit.pid,
            "startup_seconds": stack.livekit.startup_seconds,
        },
        "turn": {"uris": list(stack.coturn.uris), "log": str(stack.coturn.log_path)},
        "users": [
            {
                "user_id": u.user_id,
                "password": u.password,
                "access_token": u.access_token,
                "device_id": u.device_id,
            }
            for u in stack.users
        ],
    }


def _print_human(info: dict[str, Any]) -> None:
    syn, lk = info["synapse"], info["livekit"]
    lines = [
        f"run dir        {info['run_dir']}",
        f"synapse        {syn['base_url']}  (server name {syn['server_name']}, "
        f"up in {syn['startup_seconds']:.2f} s)",
        f"livekit        {lk['url']}  (API {lk['http_url']}, up in {lk['startup_seconds']:.2f} s)",
        f"livekit key    {lk['api_key']}",
        f"livekit secret {lk['api_secret']}",
    ]
    for u in info["users"]:
        lines.append(
            f"user           {u['user_id']}  password {u['password']}  "
            f"token {u['access_token']}  device {u['device_id']}"
        )
    lines.append("turn           " + "  ".join(info["turn"]["uris"]))
    lines.append("logs           " + "  ".join([syn["log"], lk["log"], info["turn"]["log"]]))
    lines.append("Ctrl-C or SIGTERM stops everything.")
    print("\n".join(lines), flush=True)


async def _up(args: argparse.Namespace, run_dir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with local_stack(
            run_dir,
            usernames=tuple(args.users or ("alice", "bob")),
            livekit_service_url=args.livekit_service_url,
        ) as stack:
            info = describe(stack)
            if args.json:
                print(json.dumps(info), flush=True)
            else:
                _print_human(info)
            await stop.wait()
            log.info("stopping the local stack")
    except MatrixRTCError as e:
        log.error("local stack failed", error=str(e))
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("local stack stopped", run_dir=str(run_dir))
    return 0


def _run_up(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir or new_run_dir(prefix="stack")
    run_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_up(args, run_dir))
