"""Where the controller reads Matrix room state from (the operator's own homeserver).

Two sources, each granted by the operator:

- :class:`AdminStateSource` — a homeserver admin token and Synapse's admin API
  (``GET /_synapse/admin/v1/rooms/{room}/state``): every room the homeserver takes part in,
  whether or not any local account is joined. Synapse only.
- :class:`MemberStateSource` — the access token of an ordinary "controller" account and the
  client-server API (``GET /_matrix/client/v3/rooms/{room}/state``): only rooms that account
  has joined (invite it to the rooms whose calls it should police). Any homeserver.

Neither sees MSC4354 sticky memberships (``m.rtc.member`` events are not room state); both
see ``org.matrix.msc3401.call.member`` state memberships and ``m.room.member``. A room the
source cannot read (not joined, unknown, homeserver down) is reported as None: the controller
then knows nothing about it and acts on nothing Matrix-based there.

The URL is the operator's own configuration, not something a request can steer, so these
requests do not go through the SSRF guard.
"""

from __future__ import annotations

import time
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import structlog

__all__ = ["AdminStateSource", "MatrixSource", "MemberStateSource", "SourceCheck"]

log = structlog.get_logger(__name__)


class SourceCheck:
    """Outcome of the start-up probe: ``ok`` and a sentence for the operator."""

    def __init__(self, ok: bool, message: str) -> None:
        self.ok = ok
        self.message = message


class MatrixSource(Protocol):
    kind: str
    last_failure: float  # wall time the homeserver last failed to answer (0 = never)

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def probe(self) -> SourceCheck:
        """Check the credentials once, at start-up."""
        ...

    async def room_state(self, room_id: str) -> list[dict[str, Any]] | None:
        """The room's current state events, or None when this source cannot see the room."""
        ...


class _HttpSource:
    kind = "?"

    def __init__(self, base_url: str, token: str, *, timeout: float = 5.0) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._failures = 0
        self.last_failure = 0.0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"Authorization": f"Bearer {self._token}"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(self, path: str) -> tuple[int, Any]:
        assert self._session is not None, "source not started"
        async with self._session.get(self._base + path) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            return resp.status, body

    async def _whoami(self) -> tuple[str | None, str]:
        try:
            status, body = await self._get("/_matrix/client/v3/account/whoami")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"homeserver {self._base} unreachable: {exc or type(exc).__name__}"
        if status != 200 or not isinstance(body, dict) or "user_id" not in body:
            err = body.get("errcode") if isinstance(body, dict) else status
            return None, f"homeserver {self._base} refused the token ({status} {err})"
        return str(body["user_id"]), ""

    async def _state(self, path: str, room_id: str) -> Any:
        try:
            status, body = await self._get(path)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failures += 1
            self.last_failure = time.time()
            if self._failures == 1 or self._failures % 100 == 0:
                log.warning(
                    "room state unavailable", source=self.kind, room=room_id, reason=str(exc)[:200]
                )
            return None
        self._failures = 0
        if status >= 500:
            self.last_failure = time.time()
        if status != 200:
            log.debug("room state refused", source=self.kind, room=room_id, status=status)
            return None
        return body


class AdminStateSource(_HttpSource):
    """Synapse admin API with a server admin's access token."""

    kind = "admin"

    async def probe(self) -> SourceCheck:
        user, err = await self._whoami()
        if user is None:
            return SourceCheck(False, err)
        status, body = await self._get(f"/_synapse/admin/v2/users/{quote(user, safe='')}")
        if status != 200 or not isinstance(body, dict) or body.get("admin") is not True:
            return SourceCheck(
                False,
                f"{user} is not a Synapse server admin (admin API answered {status}): room "
                "state is only readable for rooms that account has joined",
            )
        return SourceCheck(True, f"Synapse admin API as {user}: every room of {self._base}")

    async def room_state(self, room_id: str) -> list[dict[str, Any]] | None:
        body = await self._state(
            f"/_synapse/admin/v1/rooms/{quote(room_id, safe='')}/state", room_id
        )
        if not isinstance(body, dict) or not isinstance(body.get("state"), list):
            return None
        return [e for e in body["state"] if isinstance(e, dict)]


class MemberStateSource(_HttpSource):
    """The client-server API as an account joined to the rooms."""

    kind = "member"

    async def probe(self) -> SourceCheck:
        user, err = await self._whoami()
        if user is None:
            return SourceCheck(False, err)
        return SourceCheck(True, f"client API as {user}: only rooms that account has joined")

    async def room_state(self, room_id: str) -> list[dict[str, Any]] | None:
        body = await self._state(
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state", room_id
        )
        if not isinstance(body, list):
            return None
        return [e for e in body if isinstance(e, dict)]
