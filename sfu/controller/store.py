"""Persistence of delegated delayed-leave jobs (Redis when ``LIVEKIT_REDIS_URL`` is set).

The Redis layout is lk-jwt-service's (hash ``lk-jwt:jobs``; field = Go ``json.Marshal`` of
``[room, identity]``; value ``{"Params":{"DelayId","DelayTimeout"(ns),"ServerName",
"LiveKitRoom","LiveKitIdentity"},"RestartedAt":RFC 3339}``), so jobs survive a switch between
the two services in either direction. We add ``SeenConnected`` (Go ignores unknown fields).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from matrixrtc.model.livekit_ids import go_json_string_array

__all__ = ["JobParams", "JobStore", "MemoryStore", "RedisStore", "StoredJob"]

log = structlog.get_logger(__name__)

JOBS_KEY = "lk-jwt:jobs"
_DELETE_IF_SAME = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local ok, job = pcall(cjson.decode, v)
if ok and type(job) == 'table' and type(job.Params) == 'table'
   and job.Params.DelayId ~= ARGV[2] then return 0 end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True, slots=True)
class JobParams:
    """What a delegation asks for."""

    server_name: str
    delay_id: str
    delay_timeout_ms: int
    room: str
    identity: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.room, self.identity)


@dataclass(frozen=True, slots=True)
class StoredJob:
    params: JobParams
    restarted_at: float  # wall-clock seconds
    seen_connected: bool = False

    def to_json(self) -> str:
        p = self.params
        ts = datetime.fromtimestamp(self.restarted_at, UTC).isoformat().replace("+00:00", "Z")
        return json.dumps(
            {
                "Params": {
                    "DelayId": p.delay_id,
                    "DelayTimeout": p.delay_timeout_ms * 1_000_000,
                    "ServerName": p.server_name,
                    "LiveKitRoom": p.room,
                    "LiveKitIdentity": p.identity,
                },
                "RestartedAt": ts,
                "SeenConnected": self.seen_connected,
            },
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(raw: str | bytes) -> StoredJob | None:
        """Parse a stored job; None (and a log line) when it is unusable."""
        try:
            obj = json.loads(raw)
            p = obj["Params"]
            params = JobParams(
                server_name=str(p["ServerName"]),
                delay_id=str(p["DelayId"]),
                delay_timeout_ms=int(p["DelayTimeout"]) // 1_000_000,
                room=str(p["LiveKitRoom"]),
                identity=str(p["LiveKitIdentity"]),
            )
            restarted = _parse_time(str(obj["RestartedAt"]))
            seen = obj.get("SeenConnected") is True
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unparsable stored job", reason=str(exc)[:200])
            return None
        if params.delay_timeout_ms <= 0 or not params.delay_id:
            log.warning("skipping stored job without delay")
            return None
        return StoredJob(params, restarted, seen)


_FRACTION = re.compile(r"\.(\d+)")


def _parse_time(text: str) -> float:
    # Go writes RFC 3339 with up to 9 fractional digits; Python takes at most 6.
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def store_field(key: tuple[str, str]) -> str:
    return go_json_string_array(list(key)).decode()


class JobStore(Protocol):
    async def save(self, job: StoredJob) -> None: ...
    async def delete(self, key: tuple[str, str], delay_id: str) -> None:
        """Forget the job at ``key`` if it is still the one for ``delay_id``."""
        ...

    async def all(self) -> list[StoredJob]: ...
    async def close(self) -> None: ...


class MemoryStore:
    """No persistence: jobs live as long as the process."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], StoredJob] = {}

    async def save(self, job: StoredJob) -> None:
        self.jobs[job.params.key] = job

    async def delete(self, key: tuple[str, str], delay_id: str) -> None:
        job = self.jobs.get(key)
        if job is not None and job.params.delay_id == delay_id:
            del self.jobs[key]

    async def all(self) -> list[StoredJob]:
        return list(self.jobs.values())

    async def close(self) -> None:
        return None


class RedisStore:
    """Jobs in the Redis hash ``lk-jwt:jobs``."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    async def ping(self) -> None:
        await self._redis.ping()

    async def save(self, job: StoredJob) -> None:
        await self._redis.hset(JOBS_KEY, store_field(job.params.key), job.to_json())

    async def delete(self, key: tuple[str, str], delay_id: str) -> None:
        # Atomically: another worker may have stored a newer job for the same participant.
        await self._redis.eval(_DELETE_IF_SAME, 1, JOBS_KEY, store_field(key), delay_id)

    async def all(self) -> list[StoredJob]:
        fields = await self._redis.hgetall(JOBS_KEY)
        out = []
        for value in fields.values():
            job = StoredJob.from_json(value)
            if job is not None:
                out.append(job)
        return out

    async def close(self) -> None:
        await self._redis.aclose()
