"""``python -m matrixrtc demo``: a 3-participant E2EE mesh call on the embedded stack, reported.

Starts Synapse, registers three users in an encrypted room, runs three participant processes
(call agent + Olm sender keys + aiortc full mesh with frame E2EE) for ``--duration`` seconds,
prints a live progress line and the call-test report, tears everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import structlog

from matrixrtc.calltest.runner import CallTestConfig, format_report, run_call_test
from matrixrtc.devstack import new_run_dir
from matrixrtc.errors import MatrixRTCError

__all__ = ["register"]

log = structlog.get_logger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a 3-participant E2EE mesh call on an embedded local stack and report",
        description=(
            "Start Synapse, run three call participants (separate processes: call agent, "
            "Olm-distributed sender keys, aiortc full mesh with LiveKit-format frame E2EE) in "
            "an encrypted room, print progress and the call report, tear down."
        ),
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="directory for configs, data and logs (default: a new one under /tmp/matrixrtc-runs)",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="call seconds (default 20)")
    parser.set_defaults(func=_run)


def _say(line: str) -> None:
    print(line, flush=True)


def _run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir or new_run_dir(prefix="demo")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"matrixrtc demo: 3-participant E2EE mesh call; run dir {run_dir}", flush=True)
    cfg = CallTestConfig(participants=3, duration_s=args.duration, e2ee=True, run_dir=run_dir)
    t0 = time.monotonic()
    try:
        report = asyncio.run(run_call_test(cfg, progress=_say))
    except (MatrixRTCError, TimeoutError) as e:
        print(f"demo FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    print("\nreport", flush=True)
    print(format_report(report), flush=True)
    print(f"\ntotal {time.monotonic() - t0:.1f} s; logs under {run_dir}", flush=True)
    return 0
