"""Every LiveKit join token the service mints, recorded for the controller.

A :class:`Grant` says who a LiveKit (room, identity) pair belongs to in Matrix: the Matrix
room and slot, the user, device and member id, the user's homeserver, which endpoint minted
it and when. The service records a grant *before* it answers with the token, so a
participant can never reach LiveKit ahead of its record.

In Redis (``LIVEKIT_REDIS_URL``) grants live in one hash per LiveKit room,
``matrixrtc-sfu:grants:<room>`` (field = identity, value = JSON), expiring ``GRANT_TTL``
after the last token or the last time the controller saw the participant; every replica
and the stand-alone controller share them. ``matrixrtc-sfu:grants-since`` holds the wall
time the registry was first used: a participant that joined LiveKit before then may hold a
token from before the registry existed (an upgrade from lk-jwt-service), so its absence
from the registry proves nothing. Without Redis the registry lives in the process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import structlog

__all__ = [
    "GRANT_TTL",
    "Grant",
    "GrantRegistry",
    "MemoryRegistry",
    "RedisRegistry",
]

log = structlog.get_logger(__name__)

GRANT_TTL = 24 * 3600
_PREFIX = "matrixrtc-sfu:grants:"
_SINCE = "matrixrtc-sfu:grants-since"
_ENDED = "matrixrtc-sfu:ended:"
_SERVER = "matrixrtc-sfu:room-server:"


@dataclass(frozen=True, slots=True)
class Grant:
    """One minted token: LiveKit (room, identity) → Matrix (room, slot, user, device)."""

    room: str  # LiveKit room name
    identity: str  # LiveKit participant identity
    matrix_room: str
    slot_id: str
    user_id: str
    device_id: str
    member_id: str
    server_name: str
    endpoint: str  # "get_token" | "sfu_get"
    issued_at: float  # wall-clock seconds

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(raw: str | bytes) -> Grant | None:
        try:
            obj: dict[str, Any] = json.loads(raw)
            return Grant(
                room=str(obj["room"]),
                identity=str(obj["identity"]),
                matrix_room=str(obj["matrix_room"]),
                slot_id=str(obj["slot_id"]),
                user_id=str(obj["user_id"]),
                device_id=str(obj["device_id"]),
                member_id=str(obj["member_id"]),
                server_name=str(obj["server_name"]),
                endpoint=str(obj["endpoint"]),
                issued_at=float(obj["issued_at"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unparsable grant", reason=str(exc)[:200])
            return None


class GrantRegistry(Protocol):
    async def record(self, grant: Grant) -> None:
        """Remember ``grant`` (replacing an older one for the same room and identity)."""
        ...

    async def room_grants(self, room: str) -> dict[str, Grant]:
        """Every grant of LiveKit ``room``, by identity."""
        ...

    async def touch(self, room: str) -> None:
        """The room is still in use: keep its grants another ``GRANT_TTL``."""
        ...

    async def since(self) -> float:
        """Wall time the registry was first used (grants before then are unknown)."""
        ...

    async def mark_ended(self, room: str, identity: str, at: float) -> None:
        """A membership source outside the controller saw this member's call end."""
        ...

    async def ended(self, room: str) -> dict[str, float]:
        """Identities of ``room`` whose membership was marked ended, with the time."""
        ...

    async def clear_ended(self, room: str, identity: str) -> None:
        """The member delegated a new delayed leave: its membership lives again."""
        ...

    async def room_servers(self, rooms: Iterable[str]) -> dict[str, str]:
        """For each of ``rooms``, the homeserver whose user first got a token for it."""
        ...

    async def close(self) -> None: ...


class MemoryRegistry:
    """Grants of this process only (no Redis): a replica sees only the tokens it minted."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._since = clock()
        self._rooms: dict[str, dict[str, Grant]] = {}
        self._ended: dict[str, dict[str, float]] = {}
        self._servers: dict[str, str] = {}
        self._used: dict[str, float] = {}  # room → last token or touch
        self._records = 0

    async def record(self, grant: Grant) -> None:
        self._rooms.setdefault(grant.room, {})[grant.identity] = grant
        self._servers.setdefault(grant.room, grant.server_name)
        self._used[grant.room] = self._clock()
        self._records += 1
        if self._records % 1024 == 0:  # forget rooms unused for GRANT_TTL, as Redis would
            old = self._clock() - GRANT_TTL
            for room in [r for r, t in self._used.items() if t < old]:
                for table in (self._rooms, self._ended, self._servers, self._used):
                    table.pop(room, None)
        self._ended.get(grant.room, {}).pop(grant.identity, None)

    async def room_grants(self, room: str) -> dict[str, Grant]:
        return dict(self._rooms.get(room, {}))

    async def touch(self, room: str) -> None:
        if room in self._used:
            self._used[room] = self._clock()

    async def since(self) -> float:
        return self._since

    async def mark_ended(self, room: str, identity: str, at: float) -> None:
        self._ended.setdefault(room, {})[identity] = at

    async def ended(self, room: str) -> dict[str, float]:
        return dict(self._ended.get(room, {}))

    async def clear_ended(self, room: str, identity: str) -> None:
        self._ended.get(room, {}).pop(identity, None)

    async def room_servers(self, rooms: Iterable[str]) -> dict[str, str]:
        return {r: self._servers[r] for r in rooms if r in self._servers}

    async def close(self) -> None:
        return None


class RedisRegistry:
    """Grants in Redis, shared by every replica and the stand-alone controller."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._clock = clock
        self._since: float | None = None

    async def ping(self) -> None:
        await self._redis.ping()

    async def record(self, grant: Grant) -> None:
        key = _PREFIX + grant.room
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, grant.identity, grant.to_json())
            pipe.expire(key, GRANT_TTL)
            pipe.hdel(_ENDED + grant.room, grant.identity)
            pipe.set(_SINCE, repr(self._clock()), nx=True)
            pipe.set(_SERVER + grant.room, grant.server_name, nx=True, ex=GRANT_TTL)
            await pipe.execute()

    async def room_grants(self, room: str) -> dict[str, Grant]:
        raw = await self._redis.hgetall(_PREFIX + room)
        out: dict[str, Grant] = {}
        for field, value in raw.items():
            grant = Grant.from_json(value)
            if grant is not None:
                out[field.decode() if isinstance(field, bytes) else str(field)] = grant
        return out

    async def touch(self, room: str) -> None:
        await self._redis.expire(_PREFIX + room, GRANT_TTL)

    async def since(self) -> float:
        if self._since is None:
            now = repr(self._clock())
            await self._redis.set(_SINCE, now, nx=True)
            raw = await self._redis.get(_SINCE)
            self._since = float(raw) if raw is not None else float(now)
        return self._since

    async def mark_ended(self, room: str, identity: str, at: float) -> None:
        key = _ENDED + room
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, identity, repr(at))
            pipe.expire(key, GRANT_TTL)
            await pipe.execute()

    async def ended(self, room: str) -> dict[str, float]:
        raw = await self._redis.hgetall(_ENDED + room)
        out: dict[str, float] = {}
        for field, value in raw.items():
            try:
                out[field.decode() if isinstance(field, bytes) else str(field)] = float(value)
            except ValueError:
                continue
        return out

    async def clear_ended(self, room: str, identity: str) -> None:
        await self._redis.hdel(_ENDED + room, identity)

    async def room_servers(self, rooms: Iterable[str]) -> dict[str, str]:
        names = list(rooms)
        if not names:
            return {}
        values = await self._redis.mget([_SERVER + r for r in names])
        return {
            r: v.decode() if isinstance(v, bytes) else str(v)
            for r, v in zip(names, values, strict=True)
            if v is not None
        }

    async def close(self) -> None:
        await self._redis.aclose()
