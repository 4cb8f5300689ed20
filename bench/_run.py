"""What every benchmark's ``main`` does around its measurement."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

from matrixrtc.logging import configure_logging

__all__ = ["run_bench"]


def run_bench(
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """Run ``run(args)`` with error-level logs; its result gains ``bench_duration_s``. With
    ``--json`` (``args.json``) the result is printed as one JSON object and None returned;
    otherwise it is returned for the benchmark's own text report."""
    configure_logging(level="error")
    started = time.monotonic()
    result = asyncio.run(run(args))
    result["bench_duration_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result))
        return None
    return result
