"""A full-mesh call in the 2022 MSC3401 dialect (Hydrogen, matrix-js-sdk's legacy
``GroupCall``): the I/O adapter around :mod:`matrixrtc.session.legacy_call` and
:class:`~matrixrtc.mesh.engine.MeshEngine`.

``async with LegacyMeshCall(hs, room_id, sources=[...]) as call`` joins the room's
``org.matrix.msc3401.call`` (creating one if the room has none), publishes our device in our
user's ``org.matrix.msc3401.call.member`` (``m.calls``, read-modify-write, renewed every
45 min), and calls every other device listed there under the call's ``conf_id`` with our
session id, as those clients expect:

* **members**: devices of joined users with an unexpired, valid entry in the room's call
  (js-sdk's rules); an entry that expires or disappears hangs up exactly that peer;
* **signalling**: per peer (:mod:`matrixrtc.session.peer_policy`): Olm when the device has
  keys (Hydrogen), else plaintext in an unencrypted room (legacy js-sdk, which has no Olm path
  since v37); plaintext is accepted only in unencrypted rooms;
* **media**: plain DTLS-SRTP (neither Hydrogen nor legacy js-sdk has frame encryption), ICE
  servers from the configuration or the homeserver's ``/voip/turnServer``.

Leaving the block hangs up every call and removes our entry (keeping our other devices').
Every task is owned and cancelled on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Self

import structlog
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.errors import MatrixRTCError
from matrixrtc.matrix import Homeserver, RoomUpdate, Subscription, ToDeviceEvent
from matrixrtc.matrix.wire import now_ms
from matrixrtc.media.frames import FrameTap
from matrixrtc.mesh.engine import MeshConfig, MeshEngine
from matrixrtc.mesh.ice import ice_servers_from_turn_response
from matrixrtc.model.msc3401_2022 import GroupCallType
from matrixrtc.session.legacy_call import (
    LegacyCallSession,
    LegacyMembership,
    PutState,
    new_session_id,
)
from matrixrtc.session.mesh_signalling import DeviceRef, LocalDevice
from matrixrtc.session.peer_policy import (
    SignallingProtection,
    accept_signalling,
    signalling_protection,
)
from matrixrtc.tasks import OwnedTasks

__all__ = ["LegacyMeshCall"]

log = structlog.get_logger(__name__)

_CALL_EVENT_PREFIXES = ("m.call.", "org.matrix.call.")
_TURN_PATH = "/_matrix/client/v3/voip/turnServer"


class LegacyMeshCall:
    """See the module docstring."""

    def __init__(
        self,
        hs: Homeserver,
        room_id: str,
        *,
        sources: Sequence[MediaStreamTrack] = (),
        config: MeshConfig | None = None,
        turn_from_homeserver: bool = False,
        session_id: str | None = None,
        call_type: GroupCallType = GroupCallType.VIDEO,
        frames: FrameTap[DeviceRef] | None = None,
        clock_ms: Callable[[], int] = now_ms,
        join_timeout_s: float = 30.0,
    ) -> None:
        self.hs = hs
        self.room_id = room_id
        self._sources = tuple(sources)
        self._config = config or MeshConfig()
        self._turn_from_homeserver = turn_from_homeserver
        self._frames = frames
        self._clock_ms = clock_ms
        self._join_timeout_s = join_timeout_s
        self.session = LegacyCallSession(room_id)
        self.membership = LegacyMembership(
            self.session,
            user_id=hs.user_id,
            device_id=hs.device_id,
            session_id=session_id or new_session_id(),
            call_type=call_type,
        )
        self.engine: MeshEngine | None = None
        self.room_encrypted = False
        self.members: dict[DeviceRef, str] = {}
        self.dropped_signalling = 0
        # (sender device, event type) -> count of accepted m.call.* events (observability)
        self.received: Counter[tuple[str, str]] = Counter()
        self._wake = asyncio.Event()
        self._tasks = OwnedTasks("legacy-mesh", log, event_prefix="legacy_mesh")
        self._updates: Subscription[RoomUpdate] | None = None
        self._to_device: Subscription[ToDeviceEvent] | None = None
        self._log = log.bind(room_id=room_id, device_id=hs.device_id)

    @property
    def conf_id(self) -> str | None:
        return self.membership.conf_id

    @property
    def session_id(self) -> str:
        return self.membership.session_id

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._updates = self.hs.room_updates()
        self._to_device = self.hs.to_device_events()
        try:
            await self._start()
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def _start(self) -> None:
        # A room joined just now shows its state only with a later sync.
        while ("m.room.create", "") not in self.hs.room_state(self.room_id):
            await self.hs.wait_synced(timeout_s=self._join_timeout_s)
        self._feed_state(self.hs.room_state(self.room_id).values())
        self.room_encrypted = self.hs.is_encrypted(self.room_id) or (
            ("m.room.encryption", "") in self.hs.room_state(self.room_id)
        )
        config = self._config
        if not config.ice_servers and self._turn_from_homeserver:
            config = replace(config, ice_servers=await self._turn_servers())
        now = self._clock_ms()
        await self._put(self.membership.join(now))
        assert self.conf_id is not None
        local = LocalDevice(
            user_id=self.hs.user_id,
            device_id=self.hs.device_id,
            session_id=self.session_id,
            conf_id=self.conf_id,
        )
        self.engine = MeshEngine(
            local, self, sources=self._sources, config=config, frames=self._frames
        )
        self.engine.start()
        self._update_members()
        assert self._updates is not None
        assert self._to_device is not None
        self._spawn(self._updates_loop(self._updates), "room-updates")
        self._spawn(self._to_device_loop(self._to_device), "to-device")
        self._spawn(self._timer_loop(), "timer")
        self._log.info(
            "legacy_mesh.started",
            conf_id=self.conf_id,
            session_id=self.session_id,
            room_encrypted=self.room_encrypted,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        failure = await self._tasks.cancel()
        for sub in (self._updates, self._to_device):
            if sub is not None:
                sub.close()
        if self.engine is not None:
            await self.engine.aclose()  # hangups first, while our membership still stands
        try:
            await self._put(self.membership.leave(self._clock_ms()))
        except MatrixRTCError as e:
            self._log.warning("legacy_mesh.leave_failed", error=str(e))
        if failure is not None:
            self._log.warning("legacy_mesh.task_failed", error=str(failure))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)

    # -- state ------------------------------------------------------------------------------

    def _feed_state(self, events: Any) -> None:
        for ev in events:
            self.session.receive_state_event(ev)
        state = self.hs.room_state(self.room_id)
        joined = {
            key
            for (etype, key), ev in state.items()
            if etype == "m.room.member"
            and isinstance(ev.get("content"), Mapping)
            and ev["content"].get("membership") == "join"
        }
        self.session.set_joined_members(joined)

    async def _put(self, actions: Sequence[PutState]) -> None:
        for a in actions:
            await self.hs.put_state(self.room_id, a.event_type, a.state_key, a.content)

    def _update_members(self) -> None:
        if self.engine is None:
            return
        now = self._clock_ms()
        members = {
            DeviceRef(m.user_id, m.device_id): m.session_id for m in self.session.devices(now)
        }
        if members != self.members:
            self._log.info("legacy_mesh.members", count=len(members))
            self.members = members
            self.engine.set_members(members)
        self._wake.set()

    async def _updates_loop(self, updates: Subscription[RoomUpdate]) -> None:
        async for update in updates:
            if update.room_id != self.room_id:
                continue
            self._feed_state(update.state)
            await self._put(self.membership.observe(self._clock_ms()))
            self._update_members()

    async def _timer_loop(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock_ms()
            times = [
                t
                for t in (self.membership.next_wakeup_ms(), self.session.next_wakeup_ms(now))
                if t is not None
            ]
            timeout = None if not times else max(0.0, (min(times) - now) / 1000)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            try:
                await self._put(self.membership.tick(self._clock_ms()))
            except MatrixRTCError as e:
                self._log.warning("legacy_mesh.renew_failed", error=str(e))
            self._update_members()
            self._wake.clear()

    # -- signalling -------------------------------------------------------------------------

    async def _to_device_loop(self, events: Subscription[ToDeviceEvent]) -> None:
        async for ev in events:
            if not ev.type.startswith(_CALL_EVENT_PREFIXES) or self.engine is None:
                continue
            problem = accept_signalling(
                room_encrypted=self.room_encrypted,
                encrypted=ev.encrypted,
                claimed_device=ev.content.get("device_id"),
                verified_device=ev.sender_device,
            )
            if problem is not None:
                self.dropped_signalling += 1
                self._log.warning("legacy_mesh.signalling_dropped", reason=problem)
                continue
            self.received[(str(ev.content.get("device_id")), ev.type)] += 1
            self.engine.receive(ev.sender, ev.type, ev.content)

    async def send_to_device(
        self, user_id: str, device_id: str, event_type: str, content: Mapping[str, Any]
    ) -> None:
        message = {DeviceRef(user_id, device_id): content}
        try:
            result = await self.hs.send_to_device(event_type, message, encrypted=True)
            protection = signalling_protection(
                room_encrypted=self.room_encrypted, peer_has_olm=not result.failed
            )
            if protection is SignallingProtection.PLAINTEXT:
                await self.hs.send_to_device(event_type, message, encrypted=False)
        except MatrixRTCError as e:
            self._log.warning("legacy_mesh.send_failed", type=event_type, error=str(e))
            return
        if protection is SignallingProtection.WITHHELD:
            self._log.warning("legacy_mesh.undeliverable", type=event_type, device=device_id)

    async def _turn_servers(self) -> tuple[Any, ...]:
        try:
            body = await self.hs.request("GET", _TURN_PATH)
        except MatrixRTCError as e:
            self._log.info("legacy_mesh.no_turn_server", error=str(e))
            return ()
        return ice_servers_from_turn_response(body)
