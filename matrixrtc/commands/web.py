"""``python -m matrixrtc web``: the browser call client next to an embedded stack, for people.

Starts LiveKit, Synapse (advertising our authorization service in ``/rtc/transports`` and
``.well-known``), the service (``python -m sfu serve``), serves the built client (``web/dist``,
made by ``make bootstrap``) on 127.0.0.1, registers two users in an encrypted room and puts a
Python participant in that room's call. Prints the URL to open and the logins; Ctrl-C or
SIGTERM stops everything (``--for SECONDS``: also that long after printing; ``make demo`` uses
it after its call report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.calltest.runner import participants, provision
from matrixrtc.devstack import AuthService, LiveKit, Synapse, new_run_dir
from matrixrtc.errors import MatrixRTCError

__all__ = ["DIST", "register"]

log = structlog.get_logger(__name__)

DIST = Path(__file__).resolve().parents[2] / "web" / "dist"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "web",
        help="serve the browser call client next to an embedded stack and a Python participant",
        description=(
            "Start LiveKit, Synapse and our authorization service on 127.0.0.1, serve the built "
            "web client (web/dist), register two users in an encrypted room with a Python "
            "participant in its call, and print the URL and logins. Ctrl-C stops everything."
        ),
    )
    parser.add_argument("--port", type=int, default=8080, help="client port (default 8080)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="directory for configs, data and logs (default: a new one under /tmp/matrixrtc-runs)",
    )
    parser.add_argument(
        "--participant",
        choices=("auto", "mesh", "sfu", "none"),
        default="auto",
        help="the Python participant's transport (auto: the mesh/SFU policy; none: no one)",
    )
    parser.add_argument("--user", dest="users", action="append", default=None, metavar="NAME")
    parser.add_argument(
        "--for",
        dest="seconds",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop by itself this long after printing the URL (default: run until Ctrl-C)",
    )
    parser.set_defaults(func=_run)


@contextlib.asynccontextmanager
async def serve_client(port: int) -> Any:
    """Serve web/dist on 127.0.0.1:``port`` (0: any free port); yields the base URL."""
    app = web.Application()

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(DIST / "index.html")

    app.router.add_get("/", index)
    app.router.add_static("/", DIST)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _serve(args: argparse.Namespace, run_dir: Path) -> int:
    if not (DIST / "index.html").is_file():
        print("web/dist is missing: run `make bootstrap` first (npm ci + vite build in web/)")
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    names = list(args.users or ("alice", "bob"))
    extra: dict[str, Any] = {}
    try:
        async with LiveKit(run_dir) as livekit:
            hs = Synapse(run_dir, extra_config=extra)
            svc = AuthService(run_dir, livekit, hs)
            focus = {"type": "livekit", "livekit_service_url": svc.url}
            # Filled in before Synapse writes its config: the service's port is known now.
            extra["matrix_rtc"] = {"transports": [focus]}
            extra["extra_well_known_client_content"] = {"org.matrix.msc4143.rtc_foci": [focus]}
            async with hs, svc, serve_client(args.port) as url:
                with_py = args.participant != "none"
                prov = await provision(
                    hs.base_url, [*names, *(["python"] if with_py else [])], encrypted=True
                )
                cfgs = []
                if with_py:
                    user, password = prov.users[-1]
                    cfgs.append(
                        ParticipantConfig(
                            name="python",
                            homeserver=hs.base_url,
                            user=user,
                            password=password,
                            room_id=prov.room_id,
                            duration_s=0,
                            transport=args.participant,
                            sfu_url=svc.url if args.participant != "mesh" else None,
                        )
                    )
                async with participants(cfgs, run_dir / "participants") as procs:
                    for p in procs:
                        await p.wait_ready()
                    lines = [
                        f"open       {url}/?hs={hs.base_url}",
                        f"homeserver {hs.base_url}  (call server {svc.url})",
                    ]
                    for user, password in prov.users[: len(names)]:
                        lines.append(f"login      {user.split(':')[0][1:]}  password {password}")
                    lines.append(
                        f"room       call-test {prov.room_id} (encrypted)"
                        + ("; a Python participant is in its call" if with_py else "")
                    )
                    lines.append(
                        "media runs on 127.0.0.1: start Chromium with "
                        "--allow-loopback-in-peer-connection"
                    )
                    lines.append(f"logs       {run_dir}")
                    lines.append(
                        "Ctrl-C or SIGTERM stops everything"
                        + (f" (it stops by itself in {args.seconds:g} s)." if args.seconds else ".")
                    )
                    print("\n".join(lines), flush=True)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(args.seconds):
                            await stop.wait()
    except MatrixRTCError as e:
        log.error("web demo failed", error=str(e))
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def _run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir or new_run_dir(prefix="web")
    run_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_serve(args, run_dir))
