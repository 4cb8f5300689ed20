"""Service logging: structlog JSON lines on stderr, written in batches.

One log line per issued token is what operators expect (lk-jwt-service does the same), but
one ``write`` system call per line costs more than the rest of a warm token request when
stderr is a busy pipe. Lines are therefore buffered and written at least every
``FLUSH_INTERVAL`` seconds (an owned task started with the app), when 32 KiB are pending,
for every warning or error, and at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, BinaryIO

import structlog

from matrixrtc.tasks import OwnedTasks

__all__ = ["FLUSH_INTERVAL", "configure_service_logging", "flusher"]

FLUSH_INTERVAL = 0.2
_URGENT = frozenset({"warning", "warn", "error", "critical", "exception", "fatal"})


class _Sink:
    """Buffered lines for ``stream``; ``monotonic`` times the flush interval."""

    def __init__(
        self, stream: BinaryIO, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._monotonic = monotonic
        self._parts: list[bytes] = []
        self._size = 0
        self._last = monotonic()

    def write(self, line: str, urgent: bool) -> None:
        data = line.encode("utf-8", "replace") + b"\n"
        self._parts.append(data)
        self._size += len(data)
        now = self._monotonic()
        if urgent or self._size > 32 * 1024 or now - self._last > FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        self._last = self._monotonic()
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(data)
            self._stream.flush()


class _Logger:
    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def __getattr__(self, method: str) -> Any:
        urgent = method in _URGENT

        def emit(message: str) -> None:
            self._sink.write(message, urgent)

        return emit


_sink: _Sink | None = None


def configure_service_logging(fmt: str, level: str) -> None:
    """JSON (or console) lines on stderr with batched writes; level from LIVEKIT_LOG_LEVEL."""
    global _sink
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    _sink = _Sink(sys.stderr.buffer)
    atexit.register(_sink.flush)
    sink = _sink
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=lambda *_args: _Logger(sink),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, force=True)


async def flusher(_app: object) -> AsyncIterator[None]:
    """aiohttp ``cleanup_ctx``: flush the log buffer periodically while the app runs."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if _sink is not None:
                _sink.flush()

    tasks = OwnedTasks("log flusher", structlog.get_logger(__name__), event_prefix="logsetup")
    tasks.spawn(loop(), "flush")
    yield
    try:
        await tasks.aclose()  # raises a failure of the loop (logged when it happened)
    finally:
        if _sink is not None:
            _sink.flush()
