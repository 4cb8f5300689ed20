"""The controller account's ``/sync`` stream as a Matrix source: pushed, incremental, sticky.

:class:`SyncRooms` (no I/O) keeps, per room the account has joined, the current state of the
few event types the judge reads and the sticky ``org.matrix.msc4143.rtc.member`` events
(MSC4354) with the wall time each arrived. Sticky events come as Synapse 1.163 delivers them
(see matrixrtc's own sync, ``matrixrtc/matrix/rooms.py``): in the timeline with the PDU field
``msc4354_sticky``, and, when still live but outside the timeline window (the first sync, a
gappy one), in the room's ``msc4354_sticky`` section. A sticky event is kept
``ENDED_KEEP_MS`` past the end of its stickiness, so the judge can see that a membership
*ended* (and when), not only that it is gone.

:class:`SyncSource` long-polls ``/sync`` (filtered to those types) in an owned task, feeds
:class:`SyncRooms` and wakes the controller whenever a relevant event arrived
(:meth:`SyncSource.wait_changed`): a leave, a ban or a new membership is judged at once, not
at the next interval. Reading a room costs nothing (no request per room and interval).

What it cannot see: rooms the account has not joined (None: nothing Matrix-based is done
there); Megolm-encrypted sticky events (their senders are reported as opaque, and nobody is
removed for having no membership while they have one); anything while the stream is stale
(no successful sync for ``timeout + STALE_MARGIN_S``): then every room is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from matrixrtc.model.event_types import EventType
from matrixrtc.model.membership import CallMembership, MembershipLeft, parse_membership_event
from matrixrtc.model.msc4354 import MAX_STICKY_DURATION_MS, STICKY_FIELD, sticky_expires_at
from matrixrtc.tasks import OwnedTasks
from sfu.controller.matrix_source import (
    AdminStateSource,
    RoomSnapshot,
    SourceCheck,
    _HttpSource,
)

__all__ = [
    "ENDED_KEEP_MS",
    "SyncAndAdminSource",
    "SyncRooms",
    "SyncSource",
    "live_sticky_join",
    "sync_filter",
]

log = structlog.get_logger(__name__)

# State the judge reads (membership, room version, encryption, state-form calls).
STATE_TYPES = (
    EventType.ROOM_MEMBER,
    EventType.ROOM_CREATE,
    EventType.ROOM_ENCRYPTION,
    EventType.CALL_MEMBER,
)
# Timeline: the same, plus sticky memberships (plain or encrypted).
TIMELINE_TYPES = (*STATE_TYPES, EventType.RTC_MEMBER, "m.room.encrypted")
ENDED_KEEP_MS = 10 * 60 * 1000
STALE_MARGIN_S = 15.0
# MSC4222: ask for the room's state *after* the timeline (the resolved current state, which a
# state reset can make differ from "state before the timeline + the timeline's state events").
USE_STATE_AFTER = "org.matrix.msc4222.use_state_after"
STATE_AFTER_FIELDS = ("org.matrix.msc4222.state_after", "state_after")


def sync_filter(timeline_limit: int = 50) -> str:
    """The /sync filter: only what the judge reads, no presence, account data or receipts."""
    none: dict[str, list[str]] = {"types": []}
    return json.dumps(
        {
            "presence": none,
            "account_data": none,
            "room": {
                "state": {"types": list(STATE_TYPES), "lazy_load_members": False},
                "timeline": {"types": list(TIMELINE_TYPES), "limit": timeline_limit},
                "ephemeral": none,
                "account_data": none,
            },
        },
        separators=(",", ":"),
    )


def _events(section: object) -> list[dict[str, Any]]:
    events = section.get("events") if isinstance(section, dict) else None
    return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []


class SyncRooms:
    """Rooms as the sync stream showed them (pure: raw sync JSON and wall ms passed in)."""

    def __init__(self) -> None:
        self._state: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._sticky: dict[str, dict[str, tuple[dict[str, Any], int]]] = {}

    @property
    def rooms(self) -> frozenset[str]:
        return frozenset(self._state)

    def apply(self, raw: object, now_ms: int) -> set[str]:
        """Apply one /sync response; the rooms in which something relevant changed."""
        changed: set[str] = set()
        rooms = raw.get("rooms") if isinstance(raw, dict) else None
        if not isinstance(rooms, dict):
            return changed
        joined = rooms.get("join")
        for room_id, section in (joined if isinstance(joined, dict) else {}).items():
            if (
                isinstance(room_id, str)
                and isinstance(section, dict)
                and self._joined(room_id, section, now_ms)
            ):
                changed.add(room_id)
        left = rooms.get("leave")
        for room_id in left if isinstance(left, dict) else {}:
            if self._state.pop(room_id, None) is not None:
                changed.add(room_id)
            self._sticky.pop(room_id, None)
        return changed

    def snapshot(self, room_id: str, now_ms: int) -> RoomSnapshot | None:
        state = self._state.get(room_id)
        if state is None:
            return None
        held = self._sticky.get(room_id, {})
        for event_id, (ev, received) in list(held.items()):
            expires = sticky_expires_at(ev, received)
            if expires is None or expires + ENDED_KEEP_MS <= now_ms:
                del held[event_id]
        return RoomSnapshot(list(state.values()), list(held.values()))

    def _joined(self, room_id: str, section: dict[str, Any], now_ms: int) -> bool:
        timeline = _events(section.get("timeline"))
        timeline_state = [e for e in timeline if isinstance(e.get("state_key"), str)]
        after = next((section[f] for f in STATE_AFTER_FIELDS if f in section), None)
        if after is not None:
            # MSC4222: the resolved state at the end of the timeline comes last and wins,
            # also over a newer-in-stream-order timeline event that lost state resolution.
            applied = timeline_state + _events(after)
        else:
            applied = _events(section.get("state")) + timeline_state
        store = self._state.setdefault(room_id, {})
        changed = bool(applied)
        for ev in applied:
            etype, key = ev.get("type"), ev.get("state_key")
            if isinstance(etype, str) and isinstance(key, str):
                store[(etype, key)] = ev
        sticky = _events(section.get(STICKY_FIELD)) + [e for e in timeline if STICKY_FIELD in e]
        held = self._sticky.setdefault(room_id, {})
        for ev in sticky:
            event_id = ev.get("event_id")
            if isinstance(event_id, str) and event_id not in held:
                held[event_id] = (ev, now_ms)
                changed = True
        return changed


def live_sticky_join(events: list[object], user_id: str, device_id: str, now_ms: int) -> bool:
    """Whether ``events`` (``rtc.member`` events of one sender, any order) hold a sticky join
    of ``device_id`` that is the newest event of its sticky key and may still be sticky."""
    newest: dict[str, tuple[tuple[int, str], CallMembership | MembershipLeft]] = {}
    for ev in events:
        parsed = parse_membership_event(ev)
        if parsed is None or parsed.key.sender != user_id:
            continue
        rank = (parsed.origin_server_ts, parsed.event_id)
        old = newest.get(parsed.key.key)
        if old is None or rank > old[0]:
            newest[parsed.key.key] = (rank, parsed)
    return any(
        isinstance(p, CallMembership)
        and p.device_id == device_id
        and p.origin_server_ts + MAX_STICKY_DURATION_MS > now_ms
        for _rank, p in newest.values()
    )


class SyncSource(_HttpSource):
    """The client-server API as an account joined to the rooms: /sync, long-polled."""

    kind = "sync"

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        poll_timeout: float = 20.0,
        auto_join: bool = False,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (wall seconds) dates sticky events; ``monotonic`` tells whether the last
        successful /sync is recent enough (:meth:`fresh`)."""
        super().__init__(base_url, token, timeout=poll_timeout + 15.0)
        self._poll_timeout = poll_timeout
        self._auto_join = auto_join
        self._joining: set[str] = set()
        self._clock = clock
        self._monotonic = monotonic
        self._rooms = SyncRooms()
        self._since: str | None = None
        self._last_ok = 0.0  # monotonic: last successful sync
        self._changed = asyncio.Event()
        self._tasks = OwnedTasks("sync source", log, event_prefix="controller.sync")
        self.syncs = 0

    async def start(self) -> None:
        await super().start()
        self._tasks.spawn(self._loop(), "sync")

    async def close(self) -> None:
        """Stop syncing and close the session; a failure of the sync loop (logged when it
        happened) is raised once the session is closed."""
        try:
            await self._tasks.aclose()
        finally:
            await super().close()

    async def probe(self) -> SourceCheck:
        user, err = await self._whoami()
        if user is None:
            return SourceCheck(False, err)
        return SourceCheck(
            True,
            f"/sync as {user}: only rooms that account has joined; state and sticky "
            "memberships (not Megolm-encrypted sticky ones), pushed",
        )

    @property
    def joined_rooms(self) -> frozenset[str]:
        return self._rooms.rooms

    def fresh(self) -> bool:
        return (
            self._last_ok > 0
            and self._monotonic() - self._last_ok <= self._poll_timeout + STALE_MARGIN_S
        )

    async def room(self, room_id: str) -> RoomSnapshot | None:
        if not self.fresh():
            return None
        return self._rooms.snapshot(room_id, int(self._clock() * 1000))

    async def may_hold_membership(self, room_id: str, user_id: str, device_id: str) -> bool:
        """Look back through the room's ``rtc.member`` events from ``user_id``
        (``/messages``): a sticky join of ``device_id`` that is still the newest event of its
        sticky key and less than an hour old (the longest stickiness) may be live, whether
        or not the sync stream delivered it. Any failure answers True (no removal)."""
        assert self._session is not None, "source not started"
        flt = json.dumps({"types": [EventType.RTC_MEMBER], "senders": [user_id]})
        url = f"{self._base}/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages"
        try:
            async with self._session.get(
                url, params={"dir": "b", "limit": "50", "filter": flt}
            ) as r:
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return True
        chunk = body.get("chunk") if isinstance(body, dict) else None
        if not isinstance(chunk, list):
            return True
        return live_sticky_join(chunk, user_id, device_id, int(self._clock() * 1000))

    async def current_state(self, room_id: str) -> list[dict[str, Any]] | None:
        """``GET /rooms/{room}/state`` as the joined account: the resolved current state."""
        body = await self._state(
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state", room_id
        )
        if not isinstance(body, list):
            return None
        return [e for e in body if isinstance(e, dict)]

    async def wait_changed(self, within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._changed.wait()
        news = self._changed.is_set()
        self._changed.clear()
        return news

    async def _loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._sync_once()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures += 1
                self.last_failure = self._clock()
                if self._failures == 1 or self._failures % 100 == 0:
                    log.warning(
                        "controller sync failed", failures=self._failures, reason=repr(exc)[:200]
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _accept_invites(self, body: dict[str, Any]) -> None:
        rooms = body.get("rooms")
        invites = rooms.get("invite") if isinstance(rooms, dict) else None
        for room_id in invites if isinstance(invites, dict) else {}:
            if not isinstance(room_id, str) or room_id in self._joining:
                continue
            self._joining.add(room_id)  # once per process: a refused join is not retried
            assert self._session is not None
            url = f"{self._base}/_matrix/client/v3/rooms/{quote(room_id, safe='')}/join"
            try:
                async with self._session.post(url, json={}) as r:
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            log.info("controller account invited", room=room_id, joined=ok)

    async def _sync_once(self) -> None:
        assert self._session is not None, "source not started"
        initial = self._since is None
        params = {
            "timeout": "0" if initial else str(int(self._poll_timeout * 1000)),
            "filter": sync_filter(),
            "set_presence": "offline",
            USE_STATE_AFTER: "true",
        }
        if self._since is not None:
            params["since"] = self._since
        async with self._session.get(self._base + "/_matrix/client/v3/sync", params=params) as r:
            body = await r.json(content_type=None)
            if r.status != 200 or not isinstance(body, dict):
                if r.status >= 500 or r.status == 429:
                    self.last_failure = self._clock()
                err = body.get("errcode") if isinstance(body, dict) else None
                raise RuntimeError(f"/sync answered {r.status} {err}")
        next_batch = body.get("next_batch")
        if not isinstance(next_batch, str):
            raise RuntimeError("/sync answered without next_batch")
        changed = self._rooms.apply(body, int(self._clock() * 1000))
        if self._auto_join:
            await self._accept_invites(body)
        self._since = next_batch
        self._last_ok = self._monotonic()
        if self._failures:
            log.info("controller sync resumed", after_failures=self._failures)
        self._failures = 0
        self.syncs += 1
        if initial:
            log.info("controller sync started", rooms=len(self._rooms.rooms))
        if changed or initial:
            self._changed.set()


class SyncAndAdminSource:
    """Both grants: rooms the account has joined through its /sync (sticky memberships,
    pushed), every other room through the Synapse admin API (room state only)."""

    kind = "sync+admin"

    def __init__(self, sync: SyncSource, admin: AdminStateSource) -> None:
        self.sync = sync
        self.admin = admin

    @property
    def last_failure(self) -> float:
        return max(self.sync.last_failure, self.admin.last_failure)

    async def start(self) -> None:
        await self.sync.start()
        await self.admin.start()

    async def close(self) -> None:
        await self.sync.close()
        await self.admin.close()

    async def probe(self) -> SourceCheck:
        checks = [await self.sync.probe(), await self.admin.probe()]
        return SourceCheck(all(c.ok for c in checks), "; ".join(c.message for c in checks))

    def _joined(self, room_id: str) -> bool:
        return self.sync.fresh() and room_id in self.sync.joined_rooms

    async def room(self, room_id: str) -> RoomSnapshot | None:
        if self._joined(room_id):
            return await self.sync.room(room_id)
        return await self.admin.room(room_id)

    async def wait_changed(self, within: float) -> bool:
        return await self.sync.wait_changed(within)

    async def may_hold_membership(self, room_id: str, user_id: str, device_id: str) -> bool:
        if self._joined(room_id):
            return await self.sync.may_hold_membership(room_id, user_id, device_id)
        return True

    async def current_state(self, room_id: str) -> list[dict[str, Any]] | None:
        if self._joined(room_id):
            return await self.sync.current_state(room_id)
        return await self.admin.current_state(room_id)
