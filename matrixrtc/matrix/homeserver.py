"""The homeserver adapter: one logged-in device on matrix-nio[e2e], plus what nio lacks.

:class:`Homeserver` is an async context manager. Entering it logs in (or restores the device
saved in the state directory), loads nio's crypto store, runs one sync so the caller starts
with the rooms' state, and starts the sync loop as an owned task. Leaving it stops the loop
and closes the HTTP session.

What it adds to nio, as small typed methods that raise :mod:`matrixrtc.matrix.errors`:

- MSC4140 delayed events: :meth:`Homeserver.schedule_delayed_state`,
  :meth:`Homeserver.schedule_delayed_sticky`, :meth:`Homeserver.update_delayed`;
- MSC4354 sticky events: :meth:`Homeserver.send_sticky` (Megolm-encrypted in encrypted rooms);
- MSC4143 discovery: :meth:`Homeserver.rtc_transports`, :meth:`Homeserver.well_known_rtc_foci`;
- OpenID tokens (MSC4195 SFU auth): :meth:`Homeserver.request_openid_token`;
- Olm-encrypted to-device messages to chosen devices: :meth:`Homeserver.send_to_device`
  (key query, one-time-key claim, Olm encrypt per device) and a stream of received
  to-device events carrying the *verified* sender device: :meth:`Homeserver.to_device_events`
  (both implemented in :mod:`matrixrtc.matrix.to_device`).

The sync loop fetches raw ``/sync`` JSON itself, feeds nio's ``SyncResponse`` to nio (crypto:
to-device decryption, device lists, one-time keys, Megolm keys) and hands the raw room
sections to subscribers (:meth:`Homeserver.room_updates`), so nothing nio does not model is
lost. What Synapse 1.163.2 delivers for MSC4354 (measured, see tests/integration/
test_matrix_sticky.py): a sticky event arrives in the joined room's ``timeline`` with the
top-level PDU field ``msc4354_sticky: {"duration_ms": N}`` and
``unsigned.msc4354_sticky_duration_ttl_ms``; sticky events that are still live but not in the
returned timeline window (initial or gappy sync) arrive in
``rooms.join.<room>.msc4354_sticky.events``. :class:`RoomUpdate` merges both into ``sticky``.

Secrets: access tokens, delay ids and OpenID tokens are never logged at info level.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import structlog
from nio import AsyncClientConfig, MegolmEvent, SyncResponse
from nio.exceptions import (
    LocalProtocolError,
)

from matrixrtc.errors import RemoteError
from matrixrtc.matrix import wire
from matrixrtc.matrix._nio import NioClient, nio_errors
from matrixrtc.matrix.errors import (
    DelayNotFound,
    HomeserverError,
    HomeserverTimeout,
    HomeserverUnreachable,
    LoginError,
    RateLimited,
    Unsupported,
)
from matrixrtc.matrix.state_dir import SavedSession, StateDir
from matrixrtc.matrix.to_device import ToDevice
from matrixrtc.matrix.types import (
    Broadcaster,
    DelayAction,
    DeviceRef,
    JsonDict,
    Login,
    OpenIdToken,
    RoomUpdate,
    Subscription,
    ToDeviceEvent,
    ToDeviceSendResult,
)
from matrixrtc.model import msc4354

__all__ = [
    "DelayAction",
    "DeviceRef",
    "Homeserver",
    "Login",
    "OpenIdToken",
    "RoomUpdate",
    "Subscription",
    "ToDeviceEvent",
    "ToDeviceSendResult",
]

log = structlog.get_logger(__name__)


MSC4140 = "org.matrix.msc4140"
MSC4143 = "org.matrix.msc4143"
_DELAYED_BASE = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events"
_TRANSPORTS_PATH = "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"
_WELL_KNOWN_FOCI = "org.matrix.msc4143.rtc_foci"


def _q(part: str) -> str:
    return quote(part, safe="")


def _mxid_matches(user: str, user_id: str) -> bool:
    if user.startswith("@"):
        return user == user_id
    return user_id.startswith(f"@{user}:")


# ---------------------------------------------------------------------------------------------
# The adapter


class Homeserver:
    """One device on one homeserver. See the module docstring."""

    def __init__(
        self,
        base_url: str,
        login: Login,
        *,
        state_dir: Path | None = None,
        sync_timeout_ms: int = 30_000,
        timeline_limit: int = 50,
        request_timeout_s: float = 20.0,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._login = login
        self._state_dir_path = state_dir
        self._sync_timeout_ms = sync_timeout_ms
        self._timeline_limit = timeline_limit
        self._request_timeout_s = request_timeout_s
        self._max_backoff_s = max_backoff_s

        self._http: aiohttp.ClientSession | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._state: StateDir | None = None
        self._nio: NioClient | None = None
        self._session: SavedSession | None = None
        self._versions: JsonDict | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._since: str | None = None
        self._crypto_lock = asyncio.Lock()  # nio's Olm/Megolm state is not reentrant
        self._room_updates: Broadcaster[RoomUpdate] = Broadcaster()
        self._to_device = ToDevice(self._require_nio, self.request, self._crypto_lock)
        self._room_state: dict[str, dict[tuple[str, str], JsonDict]] = {}
        # Sticky events still live, per room: event id -> (event, wall-clock ms received).
        self._room_sticky: dict[str, dict[str, tuple[JsonDict, int]]] = {}
        self._synced = asyncio.Condition()
        self.sync_count = 0
        self.connected = False
        self.sync_failures = 0
        self.last_sync_monotonic = 0.0

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._http = aiohttp.ClientSession()
        try:
            await self._start()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _start(self) -> None:
        if self._state_dir_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="matrixrtc-")
            state = StateDir(Path(self._tmp.name))
        else:
            state = StateDir(self._state_dir_path)
        state.acquire()
        self._state = state
        session = await self._log_in(state)
        self._session = session
        config = AsyncClientConfig(
            store_sync_tokens=False,
            encryption_enabled=True,
            max_timeouts=2,
            max_limit_exceeded=5,
            request_timeout=self._request_timeout_s,
        )
        nio = NioClient(
            self.base_url,
            session.user_id,
            session.device_id,
            store_path=str(state.crypto_dir),
            config=config,
        )
        nio.client_session = self._http  # one HTTP pool; closed by us, not by nio
        nio.restore_login(session.user_id, session.device_id, session.access_token)
        self._nio = nio
        await self._crypto_housekeeping()
        await self._sync_once(timeout_ms=0)
        self._sync_task = asyncio.create_task(self._sync_loop(), name=f"sync {session.user_id}")
        log.info("homeserver.ready", user_id=session.user_id, device_id=session.device_id)

    async def _close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except asyncio.CancelledError:
                pass
            except Exception as e:  # the loop already ended with an error that was logged
                log.debug("homeserver.sync_task_error", error=repr(e))
            self._sync_task = None
        self._end_subscriptions(None)
        if self._nio is not None:
            self._nio.client_session = None
            self._nio = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._state is not None:
            self._state.release()
            self._state = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- identity ---------------------------------------------------------------------------

    @property
    def user_id(self) -> str:
        return self._require_session().user_id

    @property
    def device_id(self) -> str:
        return self._require_session().device_id

    @property
    def access_token(self) -> str:
        return self._require_session().access_token

    @property
    def server_name(self) -> str:
        return self.user_id.split(":", 1)[1]

    def _require_session(self) -> SavedSession:
        if self._session is None:
            raise LoginError("not logged in (use `async with Homeserver(...)`)")
        return self._session

    def _require_nio(self) -> NioClient:
        if self._nio is None:
            raise LoginError("not logged in (use `async with Homeserver(...)`)")
        return self._nio

    async def _log_in(self, state: StateDir) -> SavedSession:
        saved = state.load()
        if saved is not None and (
            saved.homeserver != self.base_url
            or not _mxid_matches(self._login.user, saved.user_id)
            # Reusing a device id without its crypto store would clash with the device keys
            # already uploaded for it; a new device is the honest outcome.
            or not any(state.crypto_dir.glob("*.db"))
        ):
            saved = None
        if saved is not None:
            try:
                who = await self.request(
                    "GET", "/_matrix/client/v3/account/whoami", token=saved.access_token
                )
            except HomeserverError as e:
                if e.status != 401:
                    raise
                log.info("homeserver.saved_token_rejected", user_id=saved.user_id)
            else:
                if who.get("user_id") == saved.user_id and who.get("device_id") == saved.device_id:
                    log.info(
                        "homeserver.restored", user_id=saved.user_id, device_id=saved.device_id
                    )
                    return saved
        if self._login.access_token:
            token = self._login.access_token
            who = await self.request("GET", "/_matrix/client/v3/account/whoami", token=token)
            user_id, device_id = who.get("user_id"), who.get("device_id")
            if not isinstance(user_id, str) or not isinstance(device_id, str):
                raise LoginError("whoami did not return user_id and device_id for the access token")
            if not _mxid_matches(self._login.user, user_id):
                raise LoginError(f"access token belongs to {user_id}, not {self._login.user}")
            session = SavedSession(self.base_url, user_id, device_id, token)
        elif self._login.password:
            body: JsonDict = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": self._login.user},
                "password": self._login.password,
                "initial_device_display_name": self._login.device_name,
            }
            old = state.load()
            if (
                old is not None
                and _mxid_matches(self._login.user, old.user_id)
                and any(state.crypto_dir.glob("*.db"))
            ):
                body["device_id"] = old.device_id  # same device, same crypto store
            try:
                resp = await self.request("POST", "/_matrix/client/v3/login", body=body, auth=False)
            except HomeserverError as e:
                raise LoginError(f"login as {self._login.user} failed: {e}") from e
            uid, dev, tok = resp.get("user_id"), resp.get("device_id"), resp.get("access_token")
            if not (isinstance(uid, str) and isinstance(dev, str) and isinstance(tok, str)):
                raise LoginError("login response lacks user_id/device_id/access_token")
            session = SavedSession(self.base_url, uid, dev, tok)
        else:
            raise LoginError(f"no saved session for {self._login.user} and no password or token")
        state.save(session)
        log.info("homeserver.logged_in", user_id=session.user_id, device_id=session.device_id)
        return session

    # -- raw requests -----------------------------------------------------------------------

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
    ) -> JsonDict:
        """One client-server API call; the JSON object answered, or a typed error.

        ``path`` must already be quoted (use the typed methods where they exist). Pass
        ``log_path`` when the path holds a secret (delay ids) so errors do not repeat it.
        """
        if self._http is None:
            raise LoginError("homeserver adapter is not open")
        headers: dict[str, str] = {}
        bearer = token or (self._session.access_token if auth and self._session else None)
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        shown = log_path or path
        data = None if body is None else json.dumps(body)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._http.request(
                method,
                self.base_url + path,
                params=query,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s or self._request_timeout_s),
            ) as resp:
                status = resp.status
                text = await resp.text()
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError as e:
            raise HomeserverTimeout(f"{method} {shown}: no answer in time") from e
        except (aiohttp.ClientError, OSError) as e:
            raise HomeserverUnreachable(f"{method} {shown}: {type(e).__name__}: {e}") from e
        try:
            parsed: Any = json.loads(text) if text else {}
        except ValueError:
            parsed = {}
        payload: JsonDict = parsed if isinstance(parsed, dict) else {}
        if status >= 400:
            raise wire.error_from(status, payload, retry_after)
        return payload

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

    # -- rooms, state and events ------------------------------------------------------------

    async def join_room(self, room: str) -> str:
        resp = await self.request("POST", f"/_matrix/client/v3/join/{_q(room)}", body={})
        room_id = resp.get("room_id")
        if not isinstance(room_id, str):
            raise RemoteError("join answered without a room_id")
        return room_id

    async def put_state(
        self, room_id: str, event_type: str, state_key: str, content: Mapping[str, Any]
    ) -> str:
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}"
        resp = await self.request("PUT", path, body=dict(content))
        return wire.event_id(resp)

    async def get_state_event(
        self, room_id: str, event_type: str, state_key: str
    ) -> JsonDict | None:
        """The current content of one state event, or None when there is none."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}"
        try:
            return await self.request("GET", path)
        except HomeserverError as e:
            if e.status == 404:
                return None
            raise

    async def fetch_room_state(self, room_id: str) -> list[JsonDict]:
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state"
        if self._http is None:
            raise LoginError("homeserver adapter is not open")
        # The endpoint answers a JSON array, which request() does not return: ask directly.
        async with self._http.get(
            self.base_url + path,
            headers={"Authorization": f"Bearer {self.access_token}"},
            timeout=aiohttp.ClientTimeout(total=self._request_timeout_s),
        ) as resp:
            if resp.status >= 400:
                raise wire.error_from(resp.status, {}, None)
            data = await resp.json()
        return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []

    def room_state(self, room_id: str) -> Mapping[tuple[str, str], JsonDict]:
        """The room's current state as seen by the sync loop, keyed by (type, state_key)."""
        return dict(self._room_state.get(room_id, {}))

    def room_sticky(self, room_id: str) -> list[tuple[JsonDict, int]]:
        """Sticky events received and not yet expired, with the wall-clock ms of receipt
        (what the remaining-time field ``unsigned.msc4354_sticky_duration_ttl_ms`` counts from).
        Lets a consumer that subscribes late rebuild the sticky store."""
        self._prune_sticky(room_id, wire.now_ms())
        return list(self._room_sticky.get(room_id, {}).values())

    def _prune_sticky(self, room_id: str, now_ms: int) -> None:
        held = self._room_sticky.get(room_id)
        if not held:
            return
        for event_id, (ev, received) in list(held.items()):
            if received + wire.sticky_ttl_ms(ev) <= now_ms:
                del held[event_id]

    def is_encrypted(self, room_id: str) -> bool:
        nio = self._require_nio()
        room = nio.rooms.get(room_id)
        return bool(room is not None and room.encrypted)

    async def send_event(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any],
        *,
        txn_id: str | None = None,
    ) -> str:
        """Send a room event (Megolm-encrypted when the room is encrypted); its event id."""
        etype, body = await self._maybe_encrypt(room_id, event_type, dict(content))
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/send/{_q(etype)}/{_q(txn_id or wire.txn())}"
        return wire.event_id(await self.request("PUT", path, body=body))

    async def send_sticky(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any],
        sticky_duration_ms: int,
        *,
        txn_id: str | None = None,
    ) -> str:
        """Send an MSC4354 sticky event (encrypted in encrypted rooms); its event id."""
        await self._require_feature(msc4354.UNSTABLE_FEATURE)
        etype, body = await self._maybe_encrypt(room_id, event_type, dict(content))
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/send/{_q(etype)}/{_q(txn_id or wire.txn())}"
        query = {msc4354.STICKY_DURATION_PARAM: str(sticky_duration_ms)}
        return wire.event_id(await self.request("PUT", path, query=query, body=body))

    async def _maybe_encrypt(
        self, room_id: str, event_type: str, content: JsonDict
    ) -> tuple[str, JsonDict]:
        nio = self._require_nio()
        room = nio.rooms.get(room_id)
        if room is None or not room.encrypted:
            return event_type, content
        async with self._crypto_lock:
            with nio_errors("encrypt"):
                if not room.members_synced:
                    await nio.joined_members(room_id)
                if nio.should_query_keys:
                    await nio.keys_query()
                if nio.olm.should_share_group_session(room_id):
                    await nio.share_group_session(room_id, ignore_unverified_devices=True)
                etype, enc = nio.encrypt(room_id, event_type, content)
        return str(etype), dict(enc)

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
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}"
        query = {"org.matrix.msc4140.delay": str(delay_ms)}
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
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/send/{_q(event_type)}/{_q(wire.txn())}"
        query = {
            "org.matrix.msc4140.delay": str(delay_ms),
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
                f"{_DELAYED_BASE}/{_q(delay_id)}/{action.value}",
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
                    f"{_DELAYED_BASE}/{_q(delay_id)}",
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
        path = f"/_matrix/client/v3/user/{_q(self.user_id)}/openid/request_token"
        resp = await self.request("POST", path, body={})
        tok, ttype = resp.get("access_token"), resp.get("token_type")
        server, exp = resp.get("matrix_server_name"), resp.get("expires_in")
        if not (isinstance(tok, str) and isinstance(ttype, str) and isinstance(server, str)):
            raise RemoteError("OpenID token response lacks access_token/token_type/server name")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise RemoteError("OpenID token response lacks an integer expires_in")
        return OpenIdToken(tok, ttype, server, exp)

    # -- to-device (matrixrtc.matrix.to_device) -------------------------------------------

    def to_device_events(self) -> Subscription[ToDeviceEvent]:
        """Subscribe to received to-device events (decrypted; see :class:`ToDeviceEvent`)."""
        return self._to_device.subscribe()

    async def send_to_device(
        self,
        event_type: str,
        messages: Mapping[DeviceRef, Mapping[str, Any]],
        *,
        encrypted: bool = True,
    ) -> ToDeviceSendResult:
        """Send to-device messages, Olm-encrypted per device by default; see
        :meth:`matrixrtc.matrix.to_device.ToDevice.send`."""
        return await self._to_device.send(event_type, messages, encrypted=encrypted)

    # -- sync -------------------------------------------------------------------------------

    def room_updates(self) -> Subscription[RoomUpdate]:
        """Subscribe to per-room sync updates (all joined rooms; filter on ``room_id``)."""
        return self._room_updates.subscribe()

    async def wait_synced(self, after: int | None = None, timeout_s: float = 10.0) -> int:
        """Wait until a sync newer than ``after`` (default: now) has been processed."""
        target = self.sync_count if after is None else after

        async def _wait() -> int:
            async with self._synced:
                await self._synced.wait_for(lambda: self.sync_count > target)
                return self.sync_count

        async with asyncio.timeout(timeout_s):
            return await _wait()

    async def _sync_loop(self) -> None:
        backoff = 0.25
        failure: RemoteError | None = None
        try:
            while True:
                # After a failure, catch up at once instead of long-polling: the caller learns
                # promptly that we are connected again (wait_synced, connected).
                timeout_ms = 0 if failure is not None else self._sync_timeout_ms
                failure = None
                try:
                    await self._sync_once(timeout_ms=timeout_ms)
                except (HomeserverUnreachable, RateLimited) as e:
                    failure = e
                except HomeserverError as e:
                    if not e.transient:
                        raise
                    failure = e
                if failure is None:
                    backoff = 0.25
                    continue
                await self._sync_failed(failure)
                delay = backoff
                if isinstance(failure, RateLimited) and failure.retry_after_ms:
                    delay = max(delay, failure.retry_after_ms / 1000)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self._max_backoff_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("homeserver.sync_stopped", error=str(e), exc_info=True)
            self.connected = False
            self._end_subscriptions(e)
            raise

    async def _sync_failed(self, error: RemoteError) -> None:
        self.sync_failures += 1
        if self.connected:
            log.warning("homeserver.disconnected", error=str(error))
        else:
            log.debug("homeserver.sync_retry", error=str(error))
        self.connected = False

    async def _sync_once(self, timeout_ms: int) -> None:
        query = {
            "timeout": str(timeout_ms),
            "filter": json.dumps({"room": {"timeline": {"limit": self._timeline_limit}}}),
            "set_presence": "offline",
        }
        if self._since is not None:
            query["since"] = self._since
        raw = await self.request(
            "GET",
            "/_matrix/client/v3/sync",
            query=query,
            timeout_s=timeout_ms / 1000 + 15,
        )
        next_batch = raw.get("next_batch")
        if not isinstance(next_batch, str):
            raise RemoteError("sync response without next_batch")
        initial = self._since is None
        nio = self._require_nio()
        decrypted: dict[str, JsonDict] = {}
        resp = SyncResponse.from_dict(raw)
        if isinstance(resp, SyncResponse):
            try:
                await nio.receive_response(resp)
            except asyncio.CancelledError:
                raise
            except Exception:
                # nio's own processing (crypto, room models) failed on this response. Its
                # error types are not ours to enumerate; one bad response must not end the
                # loop, and the raw sections below still reach our subscribers.
                log.error("homeserver.nio_sync_failed", exc_info=True)
            for room in resp.rooms.join.values():
                for ev in room.timeline.events:
                    if getattr(ev, "decrypted", False) and isinstance(ev.source, dict):
                        decrypted[str(ev.event_id)] = ev.source
        else:
            log.warning("homeserver.sync_unparsed_by_nio", error=str(resp))
        await self._crypto_housekeeping()
        if not self.connected:
            log.info("homeserver.connected", initial=initial)
        self.connected = True
        self._since = next_batch
        to_device = raw.get("to_device")
        events = to_device.get("events") if isinstance(to_device, dict) else None
        await self._to_device.dispatch([e for e in events or [] if isinstance(e, dict)])
        self._dispatch_rooms(raw, decrypted, initial)
        self.last_sync_monotonic = time.monotonic()
        async with self._synced:
            self.sync_count += 1
            self._synced.notify_all()

    async def _crypto_housekeeping(self) -> None:
        nio = self._require_nio()
        async with self._crypto_lock:
            try:
                if nio.should_upload_keys:
                    await nio.keys_upload()
                if nio.should_query_keys:
                    await nio.keys_query()
                if nio.should_claim_keys:
                    await nio.keys_claim(nio.get_users_for_key_claiming())
                await nio.send_to_device_messages()
            except (aiohttp.ClientError, TimeoutError, OSError, LocalProtocolError) as e:
                # The next sync retries; a lost homeserver shows up there.
                log.warning("homeserver.crypto_housekeeping_failed", error=str(e))

    def _dispatch_rooms(
        self, raw: JsonDict, decrypted: Mapping[str, JsonDict], initial: bool
    ) -> None:
        rooms = raw.get("rooms")
        if not isinstance(rooms, dict):
            return
        joined = rooms.get("join")
        if isinstance(joined, dict):
            for room_id, section in joined.items():
                if isinstance(room_id, str) and isinstance(section, dict):
                    update = self._room_update(room_id, section, decrypted, initial)
                    self._room_updates.publish(update)
        left = rooms.get("leave")
        if isinstance(left, dict):
            for room_id in left:
                if isinstance(room_id, str):
                    self._room_state.pop(room_id, None)
                    self._room_sticky.pop(room_id, None)
                    self._room_updates.publish(RoomUpdate(room_id, (), (), (), initial, left=True))

    def _room_update(
        self, room_id: str, section: JsonDict, decrypted: Mapping[str, JsonDict], initial: bool
    ) -> RoomUpdate:
        state_events = wire.events(section.get("state"))
        timeline = [
            self._decrypted(room_id, e, decrypted) for e in wire.events(section.get("timeline"))
        ]
        sticky = [
            self._decrypted(room_id, e, decrypted)
            for e in wire.events(section.get(msc4354.STICKY_FIELD))
        ]
        seen = {str(e.get("event_id")) for e in sticky}
        sticky += [
            e for e in timeline if msc4354.STICKY_FIELD in e and str(e.get("event_id")) not in seen
        ]
        now = wire.now_ms()
        held = self._room_sticky.setdefault(room_id, {})
        for ev in sticky:
            held.setdefault(str(ev.get("event_id")), (ev, now))
        self._prune_sticky(room_id, now)
        applied = state_events + [e for e in timeline if isinstance(e.get("state_key"), str)]
        store = self._room_state.setdefault(room_id, {})
        for ev in applied:
            etype, key = ev.get("type"), ev.get("state_key")
            if isinstance(etype, str) and isinstance(key, str):
                store[(etype, key)] = ev
        return RoomUpdate(room_id, tuple(applied), tuple(timeline), tuple(sticky), initial)

    def _decrypted(self, room_id: str, ev: JsonDict, known: Mapping[str, JsonDict]) -> JsonDict:
        """The event with its type and content replaced by the Megolm plaintext, if we can."""
        if ev.get("type") != "m.room.encrypted" or "state_key" in ev:
            return ev
        plain = known.get(str(ev.get("event_id")))
        if plain is None:
            plain = self._decrypt_megolm(room_id, ev)
        if plain is None:
            return ev
        etype, content = plain.get("type"), plain.get("content")
        if not isinstance(etype, str) or not isinstance(content, dict):
            return ev
        # Keep the outer PDU fields (msc4354_sticky, unsigned, origin_server_ts): the
        # homeserver sets them, the sender cannot.
        return {**ev, "type": etype, "content": content, "decrypted": True}

    def _decrypt_megolm(self, room_id: str, ev: JsonDict) -> JsonDict | None:
        nio = self._nio
        if nio is None:
            return None
        try:
            parsed = MegolmEvent.from_dict(ev)
            if not isinstance(parsed, MegolmEvent):
                return None
            parsed.room_id = room_id  # sync events omit it; nio needs it to find the session
            out = nio.decrypt_event(parsed)
        except Exception as e:  # nio raises its own EncryptionError and schema errors
            log.debug("homeserver.undecryptable", room_id=room_id, reason=str(e))
            return None
        src = getattr(out, "source", None)
        return src if isinstance(src, dict) else None

    def _end_subscriptions(self, error: BaseException | None) -> None:
        self._room_updates.end(error)
        self._to_device.end(error)
