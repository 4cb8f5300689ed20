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

One module per job: this one holds the lifetime, the HTTP transport (:meth:`Homeserver.request`)
and the sync loop; :mod:`~matrixrtc.matrix.client_api` the other API calls (a mixin),
:mod:`~matrixrtc.matrix.login` logging in, :mod:`~matrixrtc.matrix.rooms` the routing of room
sections and the room state kept from them, :mod:`~matrixrtc.matrix.crypto` Megolm, and
:mod:`~matrixrtc.matrix.to_device` to-device messages.

Secrets: access tokens, delay ids and OpenID tokens are never logged at info level.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import structlog
from nio import AsyncClientConfig, SyncResponse

from matrixrtc.errors import RemoteError
from matrixrtc.matrix import login as login_mod
from matrixrtc.matrix import wire
from matrixrtc.matrix._nio import NioClient
from matrixrtc.matrix.client_api import ClientApi, q
from matrixrtc.matrix.crypto import RoomCrypto
from matrixrtc.matrix.errors import (
    HomeserverError,
    HomeserverTimeout,
    HomeserverUnreachable,
    LoginError,
    RateLimited,
    SessionEnded,
    TokenRejected,
)
from matrixrtc.matrix.login import log_in, refresh_ahead_s
from matrixrtc.matrix.rooms import RoomCache, with_legacy_state
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
from matrixrtc.tasks import OwnedTasks

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

_RECIPIENTS_KEPT = 256  # sent events whose Megolm recipients are remembered


# ---------------------------------------------------------------------------------------------
# The adapter


class Homeserver(ClientApi):
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
        clock_ms: Callable[[], int] = wire.now_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock_ms`` (wall clock, ms) dates received sticky events; ``monotonic`` stamps
        :attr:`last_sync_monotonic`."""
        self._monotonic = monotonic
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
        self._tasks = OwnedTasks("homeserver", log, event_prefix="homeserver")
        self._since: str | None = None
        self._crypto_lock = asyncio.Lock()  # nio's Olm/Megolm state is not reentrant
        self._renew_lock = asyncio.Lock()  # one token renewal at a time
        self.tokens_renewed = 0
        # Renews an expiring access token ahead of time (MSC2918): nio's own requests (keys,
        # group sessions) cannot renew it when it is refused.
        self._token_task: asyncio.Task[None] | None = None
        self.tokens_refreshed_ahead = 0
        self._room_updates: Broadcaster[RoomUpdate] = Broadcaster()
        self._to_device = ToDevice(self._require_nio, self.request, self._crypto_lock)
        self._rooms = RoomCache(now_ms=clock_ms)
        self._crypto: RoomCrypto | None = None
        # Our recent encrypted room events: who received the session each was encrypted with.
        self._room_key_recipients: dict[str, frozenset[DeviceRef]] = {}
        self._synced = asyncio.Condition()
        self.sync_count = 0
        # /sync requests sent so far; each RoomUpdate carries the number of its own request.
        self.sync_requests_started = 0
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
        session = await log_in(self.request, self.base_url, self._login, state)
        self._session = session
        self._refresh_ahead(session)
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
        self._crypto = RoomCrypto(nio, self._crypto_lock)
        await self._crypto.housekeeping()
        await self._sync_once(timeout_ms=0)
        self._sync_task = self._tasks.spawn(self._sync_loop(), "sync")
        log.info("homeserver.ready", user_id=session.user_id, device_id=session.device_id)

    async def _close(self) -> None:
        # Also when start-up failed before the sync loop: the token refresh may be armed.
        if self._sync_task is not None or len(self._tasks):
            # A sync loop that ended with an error was logged then, and its error was handed
            # to every subscription (_end_subscriptions): closing does not raise it again.
            failure = await self._tasks.cancel()
            if failure is not None:
                log.info("homeserver.sync_had_failed", error=str(failure))
            self._sync_task = None
        self._end_subscriptions(None)
        if self._nio is not None:
            self._nio.client_session = None
            self._nio = None
            self._crypto = None
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
        When the device's own access token is rejected (expired, soft logout), it is renewed
        (refresh token, else a new password login as the same device) and the call made once
        more; :class:`SessionEnded` when it cannot be.
        """
        if self._http is None:
            raise LoginError("homeserver adapter is not open")
        used = token or (self._session.access_token if auth and self._session else None)
        try:
            return await self._request_once(method, path, query, body, used, timeout_s, log_path)
        except TokenRejected as e:
            if token is not None or not auth or self._session is None:
                raise
            await self._renew(used, e)
            renewed = self._require_session().access_token
            return await self._request_once(method, path, query, body, renewed, timeout_s, log_path)

    async def _renew(self, used: str | None, cause: TokenRejected) -> None:
        async with self._renew_lock:
            session = self._require_session()
            if session.access_token != used:
                return  # renewed by a concurrent request meanwhile
            renewed = await login_mod.refresh(self.request, session)
            if renewed is None and cause.soft_logout:
                renewed = await login_mod.relogin(self.request, session, self._login)
            if renewed is None:
                why = (
                    "the refresh token was refused"
                    if session.refresh_token
                    else "there is no refresh token"
                ) + (" and no password to log in again" if not self._login.password else "")
                err = SessionEnded(cause, why)
                log.error(
                    "homeserver.session_ended",
                    user_id=session.user_id,
                    device_id=session.device_id,
                    soft_logout=cause.soft_logout,
                    error=str(err),
                )
                raise err from cause
            self._adopt(renewed)

    def _adopt(self, renewed: SavedSession) -> None:
        """Use a renewed session from now on (saved; nio's token too)."""
        self._session = renewed
        self.tokens_renewed += 1
        if self._state is not None:
            self._state.save(renewed)
        if self._nio is not None:
            self._nio.access_token = renewed.access_token
        self._refresh_ahead(renewed)

    def _refresh_ahead(self, session: SavedSession) -> None:
        """Renew ``session``'s access token before it expires, when the server said when
        (``expires_in_ms``) and gave a refresh token."""
        old = self._token_task
        if old is not None and old is not asyncio.current_task():
            old.cancel()
        self._token_task = None
        life = session.expires_in_ms
        if life is None or not session.refresh_token:
            return
        self._token_task = self._tasks.spawn(
            self._refresh_when_due(session.access_token, refresh_ahead_s(life)), "token-refresh"
        )

    async def _refresh_when_due(self, token: str, after_s: float) -> None:
        await asyncio.sleep(after_s)
        async with self._renew_lock:
            session = self._require_session()
            if session.access_token != token:
                return  # renewed meanwhile (that renewal armed its own refresh)
            try:
                renewed = await login_mod.refresh(self.request, session)
            except (HomeserverError, HomeserverUnreachable, HomeserverTimeout, RateLimited) as e:
                renewed = None
                log.warning("homeserver.refresh_ahead_failed", error=str(e))
            if renewed is None:
                # The token will be refused when it expires; that path renews it (or ends
                # the session with a clear error).
                log.warning("homeserver.refresh_ahead_refused", user_id=session.user_id)
                return
            self.tokens_refreshed_ahead += 1
            self._adopt(renewed)

    async def _request_once(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Any,
        bearer: str | None,
        timeout_s: float | None,
        log_path: str | None,
    ) -> JsonDict:
        assert self._http is not None
        headers: dict[str, str] = {}
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

    async def request_any(self, method: str, path: str) -> Any:
        """A call whose answer is any JSON value (``request`` answers objects only)."""
        if self._http is None:
            raise LoginError("homeserver adapter is not open")
        try:
            async with self._http.request(
                method,
                self.base_url + path,
                headers={"Authorization": f"Bearer {self.access_token}"},
                timeout=aiohttp.ClientTimeout(total=self._request_timeout_s),
            ) as resp:
                if resp.status >= 400:
                    raise wire.error_from(resp.status, {}, resp.headers.get("Retry-After"))
                return await resp.json()
        except TimeoutError as e:
            raise HomeserverTimeout(f"{method} {path}: no answer in time") from e
        except (aiohttp.ClientError, OSError) as e:
            raise HomeserverUnreachable(f"{method} {path}: {type(e).__name__}: {e}") from e

    # -- rooms, state and events ------------------------------------------------------------

    def room_state(self, room_id: str) -> Mapping[tuple[str, str], JsonDict]:
        """The room's current state as seen by the sync loop, keyed by (type, state_key)."""
        return self._rooms.state(room_id)

    def room_sticky(self, room_id: str) -> list[tuple[JsonDict, int]]:
        """Sticky events received and not yet expired, with the wall-clock ms of receipt
        (what the remaining-time field ``unsigned.msc4354_sticky_duration_ttl_ms`` counts from).
        Lets a consumer that subscribes late rebuild the sticky store."""
        return self._rooms.sticky(room_id)

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
        return await self._send_room_event(room_id, event_type, content, txn_id, None)

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
        query = {msc4354.STICKY_DURATION_PARAM: str(sticky_duration_ms)}
        return await self._send_room_event(room_id, event_type, content, txn_id, query)

    async def _send_room_event(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any],
        txn_id: str | None,
        query: Mapping[str, str] | None,
    ) -> str:
        sent = await self._require_crypto().encrypt(room_id, event_type, dict(content))
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/send/{q(sent.type)}/"
        path += q(txn_id or wire.txn())
        event_id = wire.event_id(await self.request("PUT", path, query=query, body=sent.content))
        if sent.recipients is not None:
            self._room_key_recipients[event_id] = sent.recipients
            while len(self._room_key_recipients) > _RECIPIENTS_KEPT:
                del self._room_key_recipients[next(iter(self._room_key_recipients))]
        return event_id

    def devices_without_room_key(self, room_id: str, event_id: str) -> frozenset[DeviceRef]:
        """Member devices of ``room_id`` (as far as we know them) that were not sent the
        Megolm session of our event ``event_id``, so cannot read it: they came later.

        Empty when the event was not encrypted, or is not one of our recent sends."""
        recipients = self._room_key_recipients.get(event_id)
        if recipients is None or self._crypto is None:
            return frozenset()
        return self._crypto.member_devices(room_id) - recipients

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
            # MSC4222: the resolved state after the timeline (ignored where unsupported)
            "org.matrix.msc4222.use_state_after": "true",
        }
        if self._since is not None:
            query["since"] = self._since
        self.sync_requests_started += 1
        request_no = self.sync_requests_started
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
        resp = SyncResponse.from_dict(with_legacy_state(raw))
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
        crypto = self._require_crypto()
        await crypto.housekeeping()
        if not self.connected:
            log.info("homeserver.connected", initial=initial)
        self.connected = True
        self._since = next_batch
        to_device = raw.get("to_device")
        events = to_device.get("events") if isinstance(to_device, dict) else None
        await self._to_device.dispatch([e for e in events or [] if isinstance(e, dict)])
        for update in self._rooms.updates(
            raw, lambda room_id, ev: crypto.decrypted(room_id, ev, decrypted), initial
        ):
            self._room_updates.publish(dataclasses.replace(update, sync_request=request_no))
        self.last_sync_monotonic = self._monotonic()
        async with self._synced:
            self.sync_count += 1
            self._synced.notify_all()

    def _require_crypto(self) -> RoomCrypto:
        if self._crypto is None:
            raise LoginError("not logged in (use `async with Homeserver(...)`)")
        return self._crypto

    def _end_subscriptions(self, error: BaseException | None) -> None:
        self._room_updates.end(error)
        self._to_device.end(error)
