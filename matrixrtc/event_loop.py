"""The event loop our own media processes run on: uvloop, unless told otherwise.

A call participant's media path is a chain of event-loop hops per packet (socket read, ICE,
DTLS/SRTP, RTP receiver, frame assembly, decrypt, decode; and on the way out encoder, fan-out,
one RTP sender per peer). uvloop (libuv, in C) runs each hop and each UDP read for less than
asyncio's pure-Python selector loop. :func:`run` is what ``python -m matrixrtc`` commands that
carry media, the call-test participants and the media benchmarks' member processes use in place
of :func:`asyncio.run`.

``MATRIXRTC_EVENT_LOOP=asyncio`` selects asyncio's own loop (for comparison, or if a platform
lacks uvloop, which has no Windows build). Library users pick their own loop: nothing in
``matrixrtc`` needs either one. Under uvloop, :func:`matrixrtc.media.ice.batch_udp_reads`
has nothing to do (its patch is for asyncio's selector transport; libuv batches reads itself).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

from matrixrtc.errors import ConfigError

__all__ = ["ENV", "loop_name", "run"]

T = TypeVar("T")

ENV: Final = "MATRIXRTC_EVENT_LOOP"


def loop_name() -> str:
    """ "uvloop" or "asyncio": what :func:`run` will use (the environment, then availability)."""
    wanted = os.environ.get(ENV, "uvloop").strip().lower() or "uvloop"
    if wanted not in ("uvloop", "asyncio"):
        raise ConfigError(f"{ENV} must be 'uvloop' or 'asyncio', not {wanted!r}")
    if wanted == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
    return wanted


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """:func:`asyncio.run` on the loop :func:`loop_name` names."""
    try:
        name = loop_name()
    except ConfigError:
        main.close()  # never run: no "coroutine was never awaited" warning on top
        raise
    if name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop, debug=debug) as runner:
            return runner.run(main)
    return asyncio.run(main, debug=debug)
