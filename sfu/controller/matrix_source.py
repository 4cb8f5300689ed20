"""Where the controller reads Matrix rooms from (the operator's own homeserver).

Two sources, each granted by the operator:

- :class:`AdminStateSource` — a homeserver admin token and Synapse's admin API
  (``GET /_synapse/admin/v1/rooms/{room}/state``, read again every interval): every room the
  homeserver takes part in, whether or not any local account is joined. Synapse only. It
  **cannot see MSC4354 sticky memberships** (``org.matrix.msc4143.rtc.member`` events are
  not room state), so with it nobody is ever removed for having no membership.
- :class:`~sfu.controller.sync_source.SyncSource` — the access token of an ordinary
  "controller" account and its ``/sync`` stream: only rooms that account has joined (invite
  it to the rooms whose calls it should police), but state-form *and* sticky memberships
  (unencrypted ones; an encrypted sticky event cannot be read), pushed as they happen.
  Any homeserver.

A room the source cannot read (not joined, unknown, homeserver down, sync stale) is reported
as None: the controller then knows nothing about it and acts on nothing Matrix-based there.

The URL is the operator's own configuration, not something a request can steer, so these
requests do not go through the SSRF guard.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import structlog

__all__ = ["AdminStateSource", "MatrixSource", "RoomSnapshot", "SourceCheck"]

log = structlog.get_logger(__name__)


class SourceCheck:
    """Outcome of the start-up probe: ``ok`` and a sentence for the operator."""

    def __init__(self, ok: bool, message: str) -> None:
        self.ok = ok
        self.message = message


@dataclass(frozen=True, slots=True)
class RoomSnapshot:
    """One Matrix room as a source sees it now."""

    state: list[dict[str, Any]]  # current state events, client format
    # Sticky events held (each with the wall ms it was received), or None: not visible.
    sticky: list[tuple[dict[str, Any], int]] | None = None


class MatrixSource(Protocol):
    kind: str

    @property
    def last_failure(self) -> float:
        """Wall time the homeserver last failed to answer (0 = never)."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def probe(self) -> SourceCheck:
        """Check the credentials once, at start-up."""
        ...

    async def room(self, room_id: str) -> RoomSnapshot | None:
        """The room as far as this source sees it, or None when it cannot see the room."""
        ...

    async def wait_changed(self, within: float) -> bool:
        """Wait up to ``within`` s for news from the homeserver; True if there is some
        (a source that only polls just sleeps and answers False)."""
        ...

    async def may_hold_membership(self, room_id: str, user_id: str, device_id: str) -> bool:
        """Asked before removing a participant for having no membership: False only when the
        source can positively confirm that the device holds no live sticky membership."""
        ...

    async def current_state(self, room_id: str) -> list[dict[str, Any]] | None:
        """The room's resolved current state read from the homeserver now (the last look
        before a removal), or None when it cannot be read."""
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

    async def wait_changed(self, within: float) -> bool:
        await asyncio.sleep(within)
        return False

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
    """Synapse admin API with a server admin's access token.

    Per room with a LiveKit call and per interval it reads the room's whole current state in
    one request. Synapse's admin API can filter by one event type per request, but not by
    state key, and has no "changes since" form: reading call memberships and room members
    apart was measured (bench/controller_admin.py, 100 members, 30 other state events) at
    54 KB in 6.8 ms against 67 KB in 4.6 ms for the whole state, members dominating either
    way, so the one request stays. The /sync source reads nothing per interval."""

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
        return SourceCheck(
            True,
            f"Synapse admin API as {user}: every room of {self._base}, but no MSC4354 sticky "
            "memberships (nobody is removed for having no membership)",
        )

    async def may_hold_membership(self, room_id: str, user_id: str, device_id: str) -> bool:
        return True  # room state never shows sticky memberships

    async def room(self, room_id: str) -> RoomSnapshot | None:
        state = await self.current_state(room_id)
        return None if state is None else RoomSnapshot(state)

    async def current_state(self, room_id: str) -> list[dict[str, Any]] | None:
        body = await self._state(
            f"/_synapse/admin/v1/rooms/{quote(room_id, safe='')}/state", room_id
        )
        if not isinstance(body, dict) or not isinstance(body.get("state"), list):
            return None
        return [e for e in body["state"] if isinstance(e, dict)]
