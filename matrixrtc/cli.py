"""``python -m matrixrtc``: the command-line entry point.

Each sub-command lives in ``matrixrtc/commands/<name>.py`` and exposes
``register(subparsers) -> None``; it sets ``func`` (an ``argparse`` default) to a callable
taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from typing import cast

from matrixrtc.logging import configure_logging

# Add new commands here (command names; the module under matrixrtc.commands has "_" for "-").
COMMANDS: tuple[str, ...] = (
    "stack",
    "demo",
    "join",
    "call-test",
    "play",
    "record",
    "recording-key",
    "decrypt-recording",
    "web",
    "legacy-call",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m matrixrtc",
        description="MatrixRTC tools: a local stack, call agents, mesh and SFU call tests.",
    )
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console",
        help="log output format (default: console; json for services)",
    )
    parser.add_argument("--log-level", default="info", help="log level (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"matrixrtc.commands.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    func = cast(Callable[[argparse.Namespace], int], args.func)
    return func(args)
