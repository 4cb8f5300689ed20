"""LiveKit side of the service: join tokens, CreateRoom and presence lookups.

:class:`JoinTokenSigner` produces exactly the claims livekit-api's ``AccessToken`` produces for
lk-jwt-service's grants (``roomJoin``, ``canPublish``, ``canSubscribe``,
``canUpdateOwnMetadata``, ``room``, ``roomCreate: false``; ``sub``, ``iss``,
``nbf``, ``exp`` = now + 1 h), but with the JWT header and the HMAC key prepared once: the
token endpoint's warm path is then one JSON dump and one HMAC. A unit test checks the claims
against ``AccessToken`` and the signature against ``TokenVerifier``.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import aiohttp
import structlog
from livekit import api as lkapi

from matrixrtc.tasks import OwnedTasks
from sfu.common import metrics

__all__ = ["TOKEN_TTL_SECONDS", "JoinTokenSigner", "LiveKitRooms"]

log = structlog.get_logger(__name__)

TOKEN_TTL_SECONDS = 3600
EMPTY_TIMEOUT = 300
DEPARTURE_TIMEOUT = 20


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class JoinTokenSigner:
    """HS256 LiveKit join tokens with lk-jwt-service's grants."""

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        *,
        ttl: int = TOKEN_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = api_key
        self._ttl = ttl
        self._clock = clock
        self._header = _b64(b'{"alg":"HS256","typ":"JWT"}') + "."
        self._mac = hmac.new(api_secret.encode(), digestmod=hashlib.sha256)
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode

    def claims(self, room: str, identity: str) -> dict[str, object]:
        now = int(self._clock())
        return {
            "video": {
                "roomCreate": False,
                "roomJoin": True,
                "room": room,
                "canPublish": True,
                "canSubscribe": True,
                "canPublishData": True,
                "canUpdateOwnMetadata": True,
            },
            "sub": identity,
            "iss": self._key,
            "nbf": now,
            "exp": now + self._ttl,
        }

    def sign(self, room: str, identity: str) -> str:
        signing_input = self._header + _b64(self._dumps(self.claims(room, identity)).encode())
        mac = self._mac.copy()
        mac.update(signing_input.encode("ascii"))
        return signing_input + "." + _b64(mac.digest())


class LiveKitRooms:
    """CreateRoom (coalesced per room) and participant presence over LiveKit's Twirp API."""

    def __init__(
        self,
        url: str,
        api_key: str,
        api_secret: str,
        *,
        timeout: float = 10.0,
        ensured_ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._ensured_ttl = ensured_ttl
        self._ensured: dict[str, float] = {}
        self._clock = clock
        self._key = api_key
        self._secret = api_secret
        self._timeout = timeout
        self._api: lkapi.LiveKitAPI | None = None
        self._session: aiohttp.ClientSession | None = None
        self._creating: dict[str, asyncio.Task[None]] = {}
        self._tasks = OwnedTasks("livekit rooms", log, event_prefix="livekit_rooms")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self._api = lkapi.LiveKitAPI(
            self._url, self._key, self._secret, session=self._session, failover=False
        )

    async def close(self) -> None:
        await self._tasks.cancel()  # requests in flight: their requests see the outcome
        if self._api is not None:
            await self._api.aclose()
        if self._session is not None:
            await self._session.close()

    @property
    def api(self) -> lkapi.LiveKitAPI:
        if self._api is None:
            raise RuntimeError("LiveKitRooms not started")
        return self._api

    async def create_room(self, room: str) -> None:
        """Ensure ``room`` exists (empty_timeout 300 s, departure_timeout 20 s).

        Concurrent calls for one room share one CreateRoom request: it is idempotent, and
        whoever waits on it gets a room that exists once it returns. A room ensured less than
        ``ensured_ttl`` seconds ago (default 1 s; 0 = always ask, as lk-jwt-service does) is
        not asked for again, unless LiveKit reported it finished meanwhile: this widens the
        unavoidable window between CreateRoom and the client's join by at most that much.
        """
        until = self._ensured.get(room)
        if until is not None and until > self._clock():
            return
        task = self._creating.get(room)
        if task is None:
            task = self._tasks.spawn(
                self._create(room), f"create {room}", context=contextvars.Context(), awaited=True
            )
            self._creating[room] = task
            task.add_done_callback(lambda _t: self._creating.pop(room, None))
        await asyncio.shield(task)

    async def _create(self, room: str) -> None:
        try:
            await self.api.room.create_room(
                lkapi.CreateRoomRequest(
                    name=room,
                    empty_timeout=EMPTY_TIMEOUT,
                    departure_timeout=DEPARTURE_TIMEOUT,
                    max_participants=0,
                )
            )
        except Exception:
            metrics.ROOMS_CREATED.labels("error").inc()
            raise
        metrics.ROOMS_CREATED.labels("ok").inc()
        if self._ensured_ttl > 0:
            if len(self._ensured) > 10_000:
                self._ensured.clear()
            self._ensured[room] = self._clock() + self._ensured_ttl

    def forget(self, room: str) -> None:
        """LiveKit closed ``room``: the next request must create it again."""
        self._ensured.pop(room, None)

    async def participant_count(self, room: str, *, other_than: str) -> int:
        """Participants of ``room`` except ``other_than`` (0 when the room does not exist)."""
        res = await self.api.room.list_participants(lkapi.ListParticipantsRequest(room=room))
        return sum(1 for p in res.participants if p.identity != other_than)

    async def room_names(self) -> set[str]:
        res = await self.api.room.list_rooms(lkapi.ListRoomsRequest())
        return {r.name for r in res.rooms}

    async def participant_present(self, room: str, identity: str) -> bool:
        """True if present, False if LiveKit says not found; raises on other failures."""
        try:
            await self.api.room.get_participant(
                lkapi.RoomParticipantIdentity(room=room, identity=identity)
            )
        except lkapi.TwirpError as exc:
            if exc.code == "not_found":
                return False
            raise
        return True
