"""The agent's state directory: credentials and the nio crypto store.

Layout (created with mode 0700; ``session.json`` 0600)::

    DIR/session.json   {"homeserver", "user_id", "device_id", "access_token", "refresh_token"?,
                        "expires_at_ms"?}
    DIR/crypto/        nio's SQLite crypto store (Olm account, Olm/Megolm sessions)
    DIR/lock           held (flock) while a process uses the directory

Reusing the directory makes a restarted agent the same device: same device id, same
identity keys, same Olm sessions, so peers need no new key query and no device sprawl.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import structlog

from matrixrtc.errors import LocalError

__all__ = ["SavedSession", "StateDir"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SavedSession:
    homeserver: str
    user_id: str
    device_id: str
    access_token: str
    refresh_token: str | None = None  # MSC2918 (spec v1.3), when the server gave one
    # How long ``access_token`` lives from now: as the server said when it issued it
    # (``expires_in_ms`` of /login or /refresh), or what is left of that for a session read
    # from disk (saved as the wall-clock time ``expires_at_ms``). None: no expiry, or not
    # known (a file written before that was saved, or one whose time has passed).
    expires_in_ms: int | None = None

    def __repr__(self) -> str:  # the token is a secret: keep it out of logs and tracebacks
        return f"SavedSession({self.homeserver!r}, {self.user_id!r}, {self.device_id!r})"


class StateDir:
    """A directory holding one device's credentials and crypto store."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: IO[bytes] | None = None

    @property
    def crypto_dir(self) -> Path:
        return self.path / "crypto"

    @property
    def session_file(self) -> Path:
        return self.path / "session.json"

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.crypto_dir.mkdir(exist_ok=True, mode=0o700)

    def acquire(self) -> None:
        """Take the directory for this process: two processes as one device would fight over
        its Olm sessions and one-time keys. Raises :class:`LocalError` if it is taken."""
        self.ensure()
        f = (self.path / "lock").open("ab")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise LocalError(f"state directory {self.path} is in use by another agent") from None
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def load(self, now_ms: int | None = None) -> SavedSession | None:
        """The saved session, or None when there is none or it is unreadable (logged).
        ``now_ms``: the wall clock (ms), to tell what is left of the token's life."""
        try:
            raw = json.loads(self.session_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("state_dir.unreadable", path=str(self.session_file), reason=str(e))
            return None
        if not isinstance(raw, dict):
            log.warning("state_dir.unreadable", path=str(self.session_file), reason="not an object")
            return None
        fields = ("homeserver", "user_id", "device_id", "access_token")
        values = [raw.get(f) for f in fields]
        if not all(isinstance(v, str) and v for v in values):
            log.warning("state_dir.unreadable", path=str(self.session_file), reason="missing field")
            return None
        hs, user, dev, tok = (str(v) for v in values)
        refresh = raw.get("refresh_token")
        saved = SavedSession(hs, user, dev, tok, refresh if isinstance(refresh, str) else None)
        expires_at = raw.get("expires_at_ms")
        if isinstance(expires_at, int) and not isinstance(expires_at, bool):
            left = expires_at - (_wall_ms() if now_ms is None else now_ms)
            if left > 0:
                saved = replace(saved, expires_in_ms=left)
        return saved

    def save(self, session: SavedSession, now_ms: int | None = None) -> None:
        """Write atomically with mode 0600 (the file holds an access token). ``now_ms``: the
        wall clock (ms) at which ``session.expires_in_ms`` counts from."""
        self.ensure()
        tmp = self.session_file.with_suffix(".tmp")
        data: dict[str, str | int] = {
            "homeserver": session.homeserver,
            "user_id": session.user_id,
            "device_id": session.device_id,
            "access_token": session.access_token,
        }
        if session.refresh_token:
            data["refresh_token"] = session.refresh_token
        if session.expires_in_ms is not None:
            start = _wall_ms() if now_ms is None else now_ms
            data["expires_at_ms"] = start + session.expires_in_ms
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.session_file)


def _wall_ms() -> int:
    return int(time.time() * 1000)
