"""Errors raised by the homeserver adapter, all under :class:`matrixrtc.errors.RemoteError`.

The homeserver's ``errcode`` is kept on :class:`HomeserverError`; the MSC4140 cases that a
caller must react to differently (unknown delay id, rate limit, delay too long, feature not
offered) get their own classes so the own-membership state machine can map them to events
without string matching.
"""

from __future__ import annotations

from typing import Any

from matrixrtc.errors import LocalError, RemoteError

__all__ = [
    "CryptoError",
    "DelayNotFound",
    "DelayTooLong",
    "HomeserverError",
    "HomeserverTimeout",
    "HomeserverUnreachable",
    "LoginError",
    "RateLimited",
    "SessionEnded",
    "TokenRejected",
    "Unsupported",
]


class HomeserverUnreachable(RemoteError):
    """The request did not get an HTTP answer (connection refused/reset, timeout)."""


class HomeserverTimeout(HomeserverUnreachable):
    """Our own time limit for the request passed before an answer came."""


class HomeserverError(RemoteError):
    """The homeserver answered with an error status."""

    def __init__(self, status: int, errcode: str, error: str, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.body = body

    @property
    def transient(self) -> bool:
        """True for answers worth retrying (5xx, 429)."""
        return self.status >= 500 or self.status == 429


class RateLimited(HomeserverError):
    """``M_LIMIT_EXCEEDED``/429; ``retry_after_ms`` is the server's hint, if it gave one."""

    def __init__(
        self,
        status: int,
        errcode: str,
        error: str,
        body: dict[str, Any],
        retry_after_ms: int | None,
    ) -> None:
        super().__init__(status, errcode, error, body)
        self.retry_after_ms = retry_after_ms


class DelayNotFound(HomeserverError):
    """``M_NOT_FOUND`` for a delay id: it fired, was cancelled, or never existed."""


class DelayTooLong(HomeserverError):
    """The requested delay exceeds the server maximum (``max_delay_ms`` when the server says)."""

    def __init__(
        self, status: int, errcode: str, error: str, body: dict[str, Any], max_delay_ms: int | None
    ) -> None:
        super().__init__(status, errcode, error, body)
        self.max_delay_ms = max_delay_ms


class Unsupported(RemoteError):
    """The homeserver does not advertise the unstable feature (per ``/versions``)."""

    def __init__(self, feature: str) -> None:
        super().__init__(f"homeserver does not support {feature}")
        self.feature = feature


class CryptoError(LocalError):
    """The Olm/Megolm machinery (nio) could not do what was asked: no group session, an
    untrusted device, a crypto store problem. The message carries nio's reason."""


class LoginError(LocalError):
    """No usable credentials: no password or token, or the homeserver rejected them."""


class TokenRejected(HomeserverError):
    """401 ``M_UNKNOWN_TOKEN``/``M_MISSING_TOKEN``: the access token is not (or no longer)
    valid. ``soft_logout``: the server keeps the device (the token expired or was soft-logged
    out); a refresh or a new login for the same device id continues where it was."""

    @property
    def soft_logout(self) -> bool:
        return self.body.get("soft_logout") is True


class SessionEnded(LoginError):
    """The access token was rejected and could not be renewed (no refresh token, the refresh
    was refused, no password): this device cannot act on the homeserver any more. The call's
    delayed leave, if armed, removes its membership when it times out."""

    def __init__(self, cause: TokenRejected, why: str) -> None:
        kind = "soft logout" if cause.soft_logout else "logged out"
        super().__init__(f"access token rejected ({kind}: {cause.errcode}) and {why}")
        self.soft_logout = cause.soft_logout
