"""The client-server API calls the adapter makes besides /sync: rooms and state, MSC4140
delayed events, MSC4143 discovery, OpenID tokens. Each is ``request()`` plus parsing; the
class is a mixin of :class:`~matrixrtc.matrix.homeserver.Homeserver`, which provides the
transport (``request``, ``request_any``) and the identity."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import structlog

from matrixrtc.errors import RemoteError
from matrixrtc.matrix import wire
from matrixrtc.matrix.errors import DelayNotFound, HomeserverError, Unsupported
from matrixrtc.matrix.types import DelayAction, JsonDict, OpenIdToken
from matrixrtc.model import msc4354

__all__ = ["MSC4140", "MSC4143", "ClientApi", "q"]

log = structlog.get_logger(__name__)

MSC4140 = "org.matrix.msc4140"
MSC4143 = "org.matrix.msc4143"
_DELAYED_BASE = f"/_matrix/client/unstable/{MSC4140}/delayed_events"
_DELAY_PARAM = f"{MSC4140}.delay"
_TRANSPORTS_PATH = f"/_matrix/client/unstable/{MSC4143}/rtc/transports"
_WELL_KNOWN_FOCI = f"{MSC4143}.rtc_foci"


def q(part: str) -> str:
    """One URL path segment, quoted."""
    return quote(part, safe="")


def _state_path(room_id: str, event_type: str, state_key: str) -> str:
    return f"/_matrix/client/v3/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}"


class ClientApi(ABC):
    """See the module docstring."""

    _versions: JsonDict | None = None

    @abstractmethod
    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        auth: bool = True,
        token: str | None = None,
        timeout_s: float | None = None,
        log_path: str | None = None,
    ) -> JsonDict: ...

    @abstractmethod
    async def request_any(self, method: str, path: str) -> Any:
        """A call whose answer is any JSON value (an array, say)."""

    @property
    @abstractmethod
    def user_id(self) -> str: ...

    # -- versions ---------------------------------------------------------------------------

    async def versions(self, refresh: bool = False) -> JsonDict:
        if self._versions is None or refresh:
            self._versions = await self.request("GET", "/_matrix/client/versions", auth=False)
        return self._versions

    async def supports(self, feature: str) -> bool:
        """Whether ``/versions`` lists ``feature`` as an enabled unstable feature."""
        features = (await self.versions()).get("unstable_features")
        return isinstance(features, dict) and features.get(feature) is True

    async def _require_feature(self, feature: str) -> None:
        if not await self.supports(feature):
            raise Unsupported(feature)

    # -- rooms and state --------------------------------------------------------------------

    async def join_room(self, room: str) -> str:
        resp = await self.request("POST", f"/_matrix/client/v3/join/{q(room)}", body={})
        room_id = resp.get("room_id")
        if not isinstance(room_id, str):
            raise RemoteError("join answered without a room_id")
        return room_id

    async def put_state(
        self, room_id: str, event_type: str, state_key: str, content: Mapping[str, Any]
    ) -> str:
        resp = await self.request(
            "PUT", _state_path(room_id, event_type, state_key), body=dict(content)
        )
        return wire.event_id(resp)

    async def get_state_event(
        self, room_id: str, event_type: str, state_key: str
    ) -> JsonDict | None:
        """The current content of one state event, or None when there is none."""
        try:
            return await self.request("GET", _state_path(room_id, event_type, state_key))
        except HomeserverError as e:
            if e.status == 404:
                return None
            raise

    async def fetch_room_state(self, room_id: str) -> list[JsonDict]:
        data = await self.request_any("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state")
        return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []

    async def enable_encryption(self, room_id: str) -> None:
        await self.put_state(
            room_id, "m.room.encryption", "", {"algorithm": "m.megolm.v1.aes-sha2"}
        )

    # -- MSC4140 delayed events -------------------------------------------------------------

    async def schedule_delayed_state(
        self,
        room_id: str,
        event_type: str,
        state_key: str,
        content: Mapping[str, Any],
        delay_ms: int,
    ) -> str:
        """Schedule a state event ``delay_ms`` from now; returns the delay id (a secret)."""
        await self._require_feature(MSC4140)
        path = _state_path(room_id, event_type, state_key)
        query = {_DELAY_PARAM: str(delay_ms)}
        return wire.delay_id(await self.request("PUT", path, query=query, body=dict(content)))

    async def schedule_delayed_sticky(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any],
        delay_ms: int,
        sticky_duration_ms: int,
    ) -> str:
        """Schedule a sticky room event; sent in plaintext, as js-sdk does (the homeserver
        cannot encrypt later and the leave content carries only the sticky key)."""
        await self._require_feature(MSC4140)
        await self._require_feature(msc4354.UNSTABLE_FEATURE)
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/send/{q(event_type)}/{q(wire.txn())}"
        query = {
            _DELAY_PARAM: str(delay_ms),
            msc4354.STICKY_DURATION_PARAM: str(sticky_duration_ms),
        }
        return wire.delay_id(await self.request("PUT", path, query=query, body=dict(content)))

    async def update_delayed(
        self, delay_id: str, action: DelayAction, *, timeout_s: float | None = None
    ) -> None:
        """Restart, cancel or send a delayed event now.

        Raises :class:`DelayNotFound` when the id is unknown (fired, cancelled, never existed).
        Falls back to the older ``POST …/{id}`` + ``{"action"}`` form on ``M_UNRECOGNIZED``.
        """
        shown = f"{_DELAYED_BASE}/<delay_id>/{action.value}"
        try:
            await self.request(
                "POST",
                f"{_DELAYED_BASE}/{q(delay_id)}/{action.value}",
                body={},
                timeout_s=timeout_s,
                log_path=shown,
            )
        except HomeserverError as e:
            if e.errcode == "M_NOT_FOUND":
                raise DelayNotFound(e.status, e.errcode, e.error, e.body) from e
            if e.errcode != "M_UNRECOGNIZED":
                raise
            try:
                await self.request(
                    "POST",
                    f"{_DELAYED_BASE}/{q(delay_id)}",
                    body={"action": action.value},
                    timeout_s=timeout_s,
                    log_path=f"{_DELAYED_BASE}/<delay_id>",
                )
            except HomeserverError as e2:
                if e2.errcode == "M_NOT_FOUND":
                    raise DelayNotFound(e2.status, e2.errcode, e2.error, e2.body) from e2
                raise
        log.debug("homeserver.delayed", action=action.value)

    # -- discovery and SFU auth -------------------------------------------------------------

    async def rtc_transports(self) -> list[JsonDict]:
        """MSC4143 ``/rtc/transports``: transport objects with a string ``type``.

        Raises :class:`Unsupported` when the homeserver does not serve the endpoint.
        """
        try:
            resp = await self.request("GET", _TRANSPORTS_PATH)
        except HomeserverError as e:
            if e.status in (400, 404, 405) or e.errcode == "M_UNRECOGNIZED":
                raise Unsupported(f"{MSC4143} rtc/transports") from e
            raise
        return wire.transport_list(resp.get("rtc_transports"), "rtc_transports")

    async def well_known_rtc_foci(self) -> list[JsonDict]:
        """``org.matrix.msc4143.rtc_foci`` from this homeserver's ``/.well-known/matrix/client``;
        ``[]`` when absent or unreadable (it is a last-resort fallback)."""
        try:
            resp = await self.request("GET", "/.well-known/matrix/client", auth=False)
        except RemoteError as e:
            log.debug("homeserver.well_known_unavailable", reason=str(e))
            return []
        return wire.transport_list(resp.get(_WELL_KNOWN_FOCI), _WELL_KNOWN_FOCI)

    async def request_openid_token(self) -> OpenIdToken:
        path = f"/_matrix/client/v3/user/{q(self.user_id)}/openid/request_token"
        resp = await self.request("POST", path, body={})
        tok, ttype = resp.get("access_token"), resp.get("token_type")
        server, exp = resp.get("matrix_server_name"), resp.get("expires_in")
        if not (isinstance(tok, str) and isinstance(ttype, str) and isinstance(server, str)):
            raise RemoteError("OpenID token response lacks access_token/token_type/server name")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise RemoteError("OpenID token response lacks an integer expires_in")
        return OpenIdToken(tok, ttype, server, exp)
