"""``python -m sfu``: the operator-side entry point.

``serve`` runs the authorization service, configured like lk-jwt-service through the
environment (see ``python -m sfu serve --help``). ``--workers N`` starts N processes that
share the listening port through SO_REUSEPORT, since one Python process uses one core.
``controller`` runs the SFU controller alone (ghost removal, room closing, one leader);
``MATRIXRTC_SFU_CONTROLLER=1`` runs it inside ``serve`` instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

from matrixrtc.errors import ConfigError

_ENV_HELP = """\
lk-jwt-service's environment variables (same meaning, defaults and start-up errors):
  LIVEKIT_URL                        LiveKit URL returned to clients, also used for its API
  LIVEKIT_KEY, LIVEKIT_SECRET        API key and secret (or LIVEKIT_KEY_FROM_FILE,
                                     LIVEKIT_SECRET_FROM_FILE, or LIVEKIT_KEY_FILE "key:secret")
  LIVEKIT_FULL_ACCESS_HOMESERVERS    required; comma/space list of server names, "*" = all
  LIVEKIT_JWT_BIND                   listen address, default ":8080" (LIVEKIT_JWT_PORT: deprecated)
  LIVEKIT_INSECURE_SKIP_VERIFY_TLS   "YES_I_KNOW_WHAT_I_AM_DOING" disables TLS verification
  LIVEKIT_LOG_LEVEL                  debug, info, warn, error
  LIVEKIT_CS_API_URL_OVERRIDES       server=url,... client-server API per server name
  LIVEKIT_REDIS_URL                  Redis for delayed-leave jobs (survive restarts)
  LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS
                                     presence re-check of delegated members, s (default 15; 0 = off)

Our additions:
"""


def _env_help() -> str:
    from sfu.auth.config import OUR_VARIABLES

    lines = [_ENV_HELP]
    for name, text in OUR_VARIABLES.items():
        lines.append(f"  {name}\n      {text}\n")
    lines.append("\nThe controller (see `python -m sfu controller --help`):\n")
    lines.append(_controller_help(intro=False))
    return "".join(lines)


def _controller_help(*, intro: bool = True) -> str:
    from sfu.controller.config import CONTROLLER_VARIABLES

    lines = []
    if intro:
        lines.append(
            "Uses the service's LIVEKIT_URL, LIVEKIT_KEY*/LIVEKIT_SECRET* and "
            "LIVEKIT_REDIS_URL (grants,\nleader election), plus:\n"
        )
    for name, text in CONTROLLER_VARIABLES.items():
        lines.append(f"  {name}\n      {text}\n")
    return "".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sfu", description="MatrixRTC SFU focus tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the authorization service (drop-in for lk-jwt-service)",
        description="Run the MatrixRTC authorization service (lk-jwt-service API).",
        epilog=_env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes sharing the port (default: MATRIXRTC_SFU_WORKERS or 1)",
    )
    sub.add_parser(
        "controller",
        help="run the SFU controller alone (ghost removal, room closing, one leader)",
        description=(
            "Remove LiveKit participants without a Matrix membership, close LiveKit rooms "
            "without Matrix members; several instances elect one leader through Redis."
        ),
        epilog=_controller_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from sfu import doctor

    doctor.build_parser(
        sub.add_parser(
            "doctor",
            help="check a deployment: discovery, CORS, token service, LiveKit, webhooks",
            description=(doctor.__doc__ or "").split("\n\n", 1)[0],
            epilog=(doctor.__doc__ or "").split("\n\n", 1)[1],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def _serve_one(reuse_port: bool) -> int:
    import asyncio

    from sfu.auth.app import create_app, create_metrics_app
    from sfu.auth.config import Config
    from sfu.common.httpserve import FD_RESERVE, ConnectionLimits, raise_nofile_limit, serve
    from sfu.logsetup import configure_service_logging, flusher

    try:
        config = Config.from_env(os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    configure_service_logging(config.log_format, config.log_level)
    import structlog

    structlog.get_logger("sfu").info(
        "Starting service",
        LIVEKIT_URL=config.livekit_url,
        LIVEKIT_JWT_BIND=f"{config.bind_host or ''}:{config.bind_port}",
        LIVEKIT_FULL_ACCESS_HOMESERVERS=list(config.full_access_homeservers),
        SkipVerifyTLS=config.skip_verify_tls,
        worker=os.environ.get("MATRIXRTC_SFU_WORKER_INDEX", "0"),
    )
    index = int(os.environ.get("MATRIXRTC_SFU_WORKER_INDEX", "0"))
    count = int(os.environ.get("MATRIXRTC_SFU_WORKER_COUNT", "1"))
    app = create_app(config, worker_index=index, worker_count=count)
    app.cleanup_ctx.append(flusher)
    before, after = raise_nofile_limit()
    max_total = config.max_conns or max(16, after - FD_RESERVE)
    limits = ConnectionLimits(
        header_timeout=config.header_timeout,
        body_timeout=config.body_timeout,
        idle_timeout=config.idle_timeout,
        max_per_client=config.max_conns_per_client,
        max_total=max_total,
    )
    structlog.get_logger("sfu").info(
        "open-file limit" + (" raised" if after > before else ""),
        soft_before=before,
        soft=after,
        max_connections=max_total,
        max_connections_per_client=limits.max_per_client,
        header_timeout=limits.header_timeout,
        body_timeout=limits.body_timeout,
        idle_timeout=limits.idle_timeout,
    )
    side = None
    if config.metrics_bind is not None and index == 0:  # worker 0 renders every worker's
        side = (create_metrics_app(), *config.metrics_bind)
    try:
        asyncio.run(
            serve(
                app,
                host=config.bind_host,
                port=config.bind_port,
                limits=limits,
                reuse_port=reuse_port,
                shutdown_timeout=5.0,
                side=side,
            )
        )
    except ConfigError as exc:  # e.g. Redis unreachable at start-up
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _supervise(workers: int) -> int:
    from sfu.auth.config import Config

    try:
        Config.from_env(os.environ)  # fail fast, once, with the real message
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="matrixrtc-sfu-metrics-")
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(workers):
        env = dict(os.environ)
        env.update(
            MATRIXRTC_SFU_WORKER_INDEX=str(index),
            MATRIXRTC_SFU_WORKER_COUNT=str(workers),
            MATRIXRTC_SFU_REUSE_PORT="1",
            PROMETHEUS_MULTIPROC_DIR=metrics_dir,
        )
        children.append(
            subprocess.Popen([sys.executable, "-m", "sfu", "serve", "--workers", "1"], env=env)
        )
    code = 0
    try:
        while True:
            exited = [c for c in children if c.poll() is not None]
            if exited:
                if not stopping:
                    code = exited[0].returncode or 1
                    stop(signal.SIGTERM, None)
                deadline = time.monotonic() + 10
                for child in children:
                    try:
                        child.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
                return code
            time.sleep(0.2)
    finally:
        import shutil

        shutil.rmtree(metrics_dir, ignore_errors=True)


def _controller() -> int:
    from aiohttp import web

    from sfu.auth.config import _log_level
    from sfu.controller.config import ControllerConfig
    from sfu.controller.controller import build_controller
    from sfu.controller.http import controller_app
    from sfu.logsetup import configure_service_logging, flusher

    try:
        config = ControllerConfig.from_env(os.environ)
        log_format = os.environ.get("MATRIXRTC_SFU_LOG_FORMAT", "json")
        if log_format not in ("json", "console"):
            raise ConfigError("MATRIXRTC_SFU_LOG_FORMAT must be json or console")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    configure_service_logging(log_format, _log_level(os.environ.get("LIVEKIT_LOG_LEVEL", "")))
    app = controller_app(build_controller(config))
    app.cleanup_ctx.append(flusher)
    try:
        web.run_app(
            app,
            host=config.bind_host,
            port=config.bind_port,
            access_log=None,
            print=None,
            shutdown_timeout=5.0,
            handle_signals=True,
        )
    except Exception as exc:  # e.g. Redis unreachable at start-up
        print(f"error: controller could not start: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "controller":
        return _controller()
    if args.command == "doctor":
        from sfu import doctor

        return doctor.main(args)
    if args.command == "serve":
        workers = args.workers
        if workers is None:
            raw = os.environ.get("MATRIXRTC_SFU_WORKERS", "1")
            workers = int(raw) if raw.isdigit() else 1
        if workers < 1:
            print("error: --workers must be at least 1", file=sys.stderr)
            return 2
        if workers > 1:
            return _supervise(workers)
        return _serve_one(os.environ.get("MATRIXRTC_SFU_REUSE_PORT") == "1")
    return 2
