"""``python -m matrixrtc call-test``: N participants (separate processes) in one call, a live
progress line and a final report (table, or one JSON object with ``--json``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from matrixrtc.calltest.runner import CallTestConfig, format_report, run_call_test
from matrixrtc.errors import MatrixRTCError

__all__ = ["add_arguments", "register", "run"]


def _resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT") from None
    if w <= 0 or h <= 0 or w % 2 or h % 4:
        raise argparse.ArgumentTypeError("width must be even and height a multiple of 4")
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--participants", type=int, default=3, help="participants (default 3)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds (default 20)")
    parser.add_argument(
        "--transport",
        choices=("auto", "mesh", "sfu"),
        default="auto",
        help="auto: the mesh/SFU policy (mesh up to --mesh-max participants, else SFU, "
        "switching live; the embedded stack starts LiveKit only when the SFU can be picked); "
        "mesh; sfu: LiveKit through our authorization service",
    )
    parser.add_argument(
        "--mesh-max", type=int, default=4, help="largest call kept on mesh by auto (default 4)"
    )
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        metavar="S",
        help="measure S seconds of the formed call: run until S seconds after every pair "
        "receives (plus the settle); --duration then bounds the wait for that "
        "(default: --duration seconds after the last join, start-up included)",
    )
    parser.add_argument(
        "--join-interval",
        type=float,
        default=0.0,
        help="seconds between one participant being in the call and the next starting "
        "(default 0: start them all at once)",
    )
    parser.add_argument(
        "--sfu-url",
        default=None,
        help="authorization service URL (lk-jwt-service API) for sfu/auto with --homeserver",
    )
    parser.add_argument(
        "--receive-only",
        type=int,
        default=0,
        metavar="K",
        help="the last K participants publish nothing and receive (and decrypt) everything, "
        "as a viewer or recorder does (default 0)",
    )
    parser.add_argument(
        "--decode-video",
        type=int,
        default=None,
        metavar="K",
        help="mesh: each participant decodes the video of K peers (the first to connect), as a "
        "client rendering K tiles; the others are received, decrypted and counted, not decoded "
        "(default: all)",
    )
    parser.add_argument(
        "--simulcast",
        action="store_true",
        help="on the SFU, publish simulcast layers (as Element Call does)",
    )
    parser.add_argument(
        "--low-layer-above",
        type=int,
        default=None,
        metavar="K",
        help="on the SFU, a receiver of more than K remote videos takes the low simulcast "
        "layer (small tiles); the report says which layer each pair took",
    )
    parser.add_argument(
        "--render-max",
        type=int,
        default=None,
        metavar="K",
        help="on the SFU, a receiver takes decoded frames of at most K remote videos (the "
        "first K); the others are received, decrypted and counted from WebRTC statistics",
    )
    parser.add_argument(
        "--preencoded",
        action="store_true",
        help="on the SFU, publish a looped VP8 clip of the pattern encoded once instead of "
        "encoding every frame",
    )
    parser.add_argument(
        "--sfu-engine",
        choices=("sdk", "aiortc"),
        default="sdk",
        help="on the SFU, the LiveKit client each participant runs: sdk (the livekit Python "
        "SDK, which decodes every subscribed video) or aiortc (ours, which decodes only the "
        "rendered ones; publishes one layer encoded once; asks for no layer) (default sdk)",
    )
    parser.add_argument("--resolution", type=_resolution, default=(320, 240))
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument(
        "--e2ee",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-participant media keys in an encrypted room (default on)",
    )
    parser.add_argument(
        "--homeserver", default=None, help="homeserver URL (default: start an embedded Synapse)"
    )
    parser.add_argument(
        "--user-prefix",
        default="calltest-",
        help="user name prefix; with MATRIXRTC_PASSWORD set, the existing users PREFIX1..N on "
        "--homeserver log in with it (default: register new users)",
    )
    parser.add_argument("--delayed-leave-ms", type=int, default=8_000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write a self-contained page with per-pair fps, bitrate and decrypt-failure "
        "timelines, joins, leaves, key rotations and transport switches marked",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "call-test",
        help="run N participants in one call (mesh, SFU or auto) and report",
        description=(
            "Run N call participants, each in its own process (call agent + sender keys + "
            "mesh), on an embedded Synapse or a given homeserver; print a live progress line "
            "and a report: connect time, first frame, fps and kbit/s per peer, decrypt "
            "failures, key-rotation latency, CPU."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> CallTestConfig:
    width, height = args.resolution
    return CallTestConfig(
        participants=args.participants,
        duration_s=args.duration,
        width=width,
        height=height,
        fps=args.fps,
        e2ee=args.e2ee,
        homeserver=args.homeserver,
        user_prefix=args.user_prefix,
        password=os.environ.get("MATRIXRTC_PASSWORD") if args.homeserver else None,
        delayed_leave_ms=args.delayed_leave_ms,
        transport=args.transport,
        mesh_max=args.mesh_max,
        sfu_url=args.sfu_url,
        join_interval_s=args.join_interval,
        window_s=args.window,
        receive_only=args.receive_only,
        decode_video=args.decode_video,
        simulcast=args.simulcast,
        low_layer_above=args.low_layer_above,
        render_max=args.render_max,
        preencoded=args.preencoded,
        sfu_engine=args.sfu_engine,
        html=args.html,
    )


def _progress(line: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[2K" + line)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    try:
        report = asyncio.run(run_call_test(cfg, progress=_progress))
    except (MatrixRTCError, TimeoutError) as e:
        print(f"\ncall-test failed: {e}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0
