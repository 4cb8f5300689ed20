"""One root error type for the whole project.

``LocalError`` means *we* misused something (bad configuration, illegal call order);
``RemoteError`` means a peer (homeserver, SFU, another client) sent something wrong or
failed. Protocol parsers never raise these out of their public entry points: they log and
drop. I/O adapters raise them at the boundary.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "LocalError",
    "MatrixRTCError",
    "RemoteError",
    "ServiceStartError",
]


class MatrixRTCError(Exception):
    """Root of every error raised by matrixrtc and sfu."""


class LocalError(MatrixRTCError):
    """We did something wrong: misconfiguration, illegal state transition, bad argument."""


class RemoteError(MatrixRTCError):
    """A remote party failed or sent something we cannot accept."""


class ConfigError(LocalError):
    """Configuration is missing or invalid; the message says which setting and why."""


class ServiceStartError(LocalError):
    """A devstack service failed to start; the message includes the tail of its log."""
