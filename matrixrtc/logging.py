"""structlog configured once, for every entry point (CLI, services, tests)."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

__all__ = ["LogFormat", "configure_logging", "library_default"]

LogFormat = Literal["console", "json"]

_configured = False


def configure_logging(fmt: LogFormat = "console", level: str = "info") -> None:
    """Configure structlog (and the stdlib root logger) to write to stderr.

    ``console`` is for people; ``json`` is one object per line for services. Calling it
    again reconfigures (the CLI may call it after parsing ``--log-format``).
    """
    global _configured
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, force=True)
    _configured = True


def library_default() -> None:
    """Where matrixrtc is used as a library (:class:`matrixrtc.Call`): unless the application
    configured structlog itself, send warnings and errors to stderr. structlog's own default
    prints every level to stdout, which would mix with the application's output."""
    if structlog.is_configured():
        return
    # Filtered by a processor, not the wrapper class: structlog.testing.capture_logs swaps
    # the processors and so still sees every level.
    structlog.configure(
        processors=[
            _warnings_and_up,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _warnings_and_up(
    logger: object, method_name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    if method_name in ("debug", "info", "msg"):
        raise structlog.DropEvent
    return event_dict
