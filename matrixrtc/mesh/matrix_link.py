"""The mesh engine wired to Matrix: a call agent's call, its to-device stream, its keys.

``async with MatrixMesh(agent, keys=keys, sources=...) as mesh`` (inside the agent's and the
keys' blocks) runs :class:`~matrixrtc.mesh.engine.MeshEngine` for the agent's call. It needs
only what :class:`MeshCall` and :class:`FrameKeys` describe (a
:class:`~matrixrtc.agent.CallAgent` and :class:`~matrixrtc.call_keys.CallKeys` fit), so the
mesh sits below the agent and the key distribution instead of importing them:

* **members**: the agent's participants, in whichever membership dialect each one writes
  (state, sticky, or the 2022 ``m.calls`` form of Hydrogen and legacy js-sdk ``GroupCall``,
  which always meshes). The mesh forms only when *every* active member advertises the mesh
  transport (``org.matrix.msc3401.full_mesh``, after any LiveKit one); a member joining or
  leaving then adds or removes exactly its peer connection. A member's MSC2746 session id is
  derived from its membership (``member_id`` and ``created_ts``; a 2022 member lists its own),
  so a rejoin is a new session and its old call is hung up with ``new_session``.
* **conf_id, per peer**: the session's mesh conf_id (:func:`mesh_conf_id`), except toward a
  peer listed in the room's 2022 call while we are listed there too: that call's id, the only
  one Hydrogen and legacy js-sdk take (:func:`peer_conf_id`). Both ids are accepted; an
  incoming call keeps the id its invite names. So one mesh mixes dialects: the 2022 dialect
  is an ``AgentConfig`` choice (``dialect`` / ``auto_dialect``), not a second link.
* **our session**: when *our* membership is replaced by a fresh one (the delayed leave fired
  while we were cut off and the agent joined again), the link continues on a new engine under
  the new session id.
* **signalling**: ``m.call.*`` to-device events through the homeserver adapter, chosen per
  peer (:mod:`matrixrtc.session.peer_policy`): Olm whenever the peer device has keys (Hydrogen
  accepts nothing else, in unencrypted rooms too), plaintext only toward a device without keys
  and only in an unencrypted room (current js-sdk's legacy GroupCall). Olm-decrypted events
  are accepted only from the verified sender device the envelope names; plaintext only where
  the room is unencrypted.
* **ICE servers**: the configuration's, else ``/_matrix/client/v3/voip/turnServer`` when
  ``turn_from_homeserver`` is set; never a public default.
* **frame E2EE**: with ``keys`` (e.g. :class:`~matrixrtc.call_keys.CallKeys`), our frames are
  encrypted with our ring and each remote device's frames are decrypted with the ring of its
  LiveKit identity (``ParticipantView.rtc_backend_identity``), the same rings the LiveKit
  transport uses. Per peer (:func:`~matrixrtc.session.peer_policy.frame_e2ee_with`): only
  where the peer takes part in frame E2EE too (``ParticipantView.frame_e2ee``); a 2022-only
  peer (Hydrogen, legacy js-sdk) gets the same encoded frames unencrypted, and its frames are
  decoded without decryption. A peer is sent only frames under a key it has been sent
  (``FrameKeys.key_sent_to``): a joiner never receives frames it cannot decrypt.

Every task is owned and cancelled on exit; leaving the block hangs up every call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Protocol, Self

import structlog
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.e2ee.cryptor import FrameCryptor, KeyRings
from matrixrtc.errors import LocalError, MatrixRTCError, RemoteError
from matrixrtc.matrix import Homeserver, Subscription, ToDeviceEvent
from matrixrtc.media.frames import FrameTap
from matrixrtc.mesh.engine import MeshConfig, MeshEngine
from matrixrtc.mesh.fanout import SharedEncoder
from matrixrtc.mesh.ice import ice_servers_from_turn_response
from matrixrtc.mesh.transform import CryptorTransform
from matrixrtc.model.livekit_ids import DEFAULT_SLOT_ID, legacy_identity
from matrixrtc.model.participant import ParticipantView
from matrixrtc.model.transports import FULL_MESH_TYPE
from matrixrtc.session.mesh_signalling import DeviceRef, LocalDevice, mesh_conf_id
from matrixrtc.session.peer_policy import (
    SignallingProtection,
    accept_signalling,
    frame_e2ee_with,
    signalling_protection,
)
from matrixrtc.tasks import OwnedTasks

__all__ = [
    "FrameKeys",
    "MatrixMesh",
    "MeshCall",
    "MeshLinkConfig",
    "mesh_session_id",
    "peer_conf_id",
]

log = structlog.get_logger(__name__)

_CALL_EVENT_PREFIXES = ("m.call.", "org.matrix.call.")
_TURN_PATH = "/_matrix/client/v3/voip/turnServer"


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshLinkConfig:
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # Ask the homeserver for TURN servers when ``mesh.ice_servers`` is empty.
    turn_from_homeserver: bool = False
    # A member without the mesh transport stops the mesh (design.md principle 5).
    require_all_mesh: bool = True
    slot_id: str = DEFAULT_SLOT_ID
    join_timeout_s: float = 30.0  # until the room shows our own membership


class MeshCall(Protocol):
    """Our presence in the call (a :class:`~matrixrtc.agent.CallAgent`)."""

    @property
    def hs(self) -> Homeserver: ...
    @property
    def room_id(self) -> str: ...
    @property
    def participants(self) -> Sequence[ParticipantView]: ...
    def changes(self) -> Subscription[Any]: ...
    async def wait_joined(self, timeout_s: float = ...) -> None: ...


class FrameKeys(Protocol):
    """Where frame keys live (a :class:`~matrixrtc.call_keys.CallKeys`)."""

    @property
    def rings(self) -> KeyRings: ...
    @property
    def identity(self) -> str: ...
    def key_sent_to(self, device: DeviceRef, index: int) -> bool:
        """Whether ``device`` has been sent our key at ``index``."""
        ...


def mesh_session_id(p: ParticipantView) -> str:
    """The MSC2746 session id of a membership: the same for every observer, new on rejoin
    (a 2022-dialect member's is the one its ``m.calls`` entry lists)."""
    return p.mesh_session_id


def peer_conf_id(me: ParticipantView, peer: ParticipantView) -> str | None:
    """The conf_id to call ``peer`` under, when it is not the session's mesh conf_id: the
    room's 2022 call when both of us are listed in it (Hydrogen and legacy js-sdk take only
    their call's id; every member that reads the 2022 dialect makes the same choice)."""
    if peer.legacy_conf_id is not None and me.legacy_conf_id is not None:
        return peer.legacy_conf_id
    return None


def _advertises_mesh(p: ParticipantView) -> bool:
    # ``transport`` is only where a member publishes; ``advertised`` is its whole list.
    return any(t.type == FULL_MESH_TYPE for t in p.advertised)


class MatrixMesh:
    """See the module docstring."""

    def __init__(
        self,
        agent: MeshCall,
        *,
        keys: FrameKeys | None = None,
        sources: Sequence[MediaStreamTrack] = (),
        config: MeshLinkConfig | None = None,
        decrypt_rings: KeyRings | None = None,
        frames: FrameTap[DeviceRef] | None = None,
        admit_new: Callable[[], bool] | None = None,
        encoders: Mapping[str, SharedEncoder] | None = None,
    ) -> None:
        """``encoders``: running encoders (encrypting with ``keys``' sender key) to send
        from instead of ``sources``, shared with another transport (``MeshEngine``).
        ``decrypt_rings`` replaces the keys' rings for *decryption* only: a test hook for a
        participant that is left out of key distribution. ``frames`` gets every decoded remote
        frame. ``admit_new``: asked at each membership change whether the call's media is on
        the mesh; while it says no (the call is moving to the SFU), members already linked
        stay and newcomers get no link: each link costs a peer connection, its handshake and
        signalling on every member's event loop, the moment the old path must carry the
        media."""
        self._admit_new = admit_new
        self._frames = frames
        self.agent = agent
        self.hs = agent.hs
        self.keys = keys
        self.config = config or MeshLinkConfig()
        self._sources = tuple(sources)
        self._encoders = encoders
        self._decrypt_rings = decrypt_rings
        self._mesh_cfg = self.config.mesh  # with the TURN servers once started
        self._identities: dict[DeviceRef, str] = {}
        self._conf_ids: dict[DeviceRef, str] = {}
        self._plain_peers: set[DeviceRef] = set()  # no frame E2EE with these
        self.engine: MeshEngine | None = None
        self.encrypted_signalling = False
        self.members: dict[DeviceRef, str] = {}
        self.dropped_signalling = 0
        # Times the members were worked out (start, each membership change, each refresh),
        # whether or not they changed: a test waits on it to know a change was judged.
        self.member_updates = 0
        # (sender device, event type) -> accepted m.call.* events (observability, tests)
        self.received: Counter[tuple[str, str]] = Counter()
        # (peer device, "olm" | "plaintext" | "withheld") -> m.call.* events sent that way
        self.sent: Counter[tuple[str, str]] = Counter()
        self._tasks = OwnedTasks("mesh-link", log, event_prefix="mesh_link")
        # Closes of engines of our earlier sessions: awaited on exit, never cancelled (a
        # cancelled close would leave its peer connections open).
        self._retiring = OwnedTasks("mesh-link-retire", log, event_prefix="mesh_link")
        self._changes: Subscription[Any] | None = None
        self._to_device: Subscription[ToDeviceEvent] | None = None
        self._log = log.bind(room_id=agent.room_id, user_id=agent.hs.user_id)

    @property
    def room_encrypted(self) -> bool:
        return self.encrypted_signalling

    @property
    def session_id(self) -> str | None:
        """Our MSC2746 session id (None before the engine runs)."""
        return None if self.engine is None else self.engine.local.session_id

    @property
    def conf_id(self) -> str:
        """The conf_id peers know our call by: the room's 2022 call while we are listed in
        it, else the session's mesh conf_id."""
        me = next((p for p in self.agent.participants if p.is_self), None)
        if me is not None and me.legacy_conf_id is not None:
            return me.legacy_conf_id
        return mesh_conf_id(self.agent.room_id, self.config.slot_id)

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        # Subscribe first: peers may send invites as soon as they see our membership, which
        # can be before we see it ourselves. Events wait in the subscriptions until we start.
        self._to_device = self.hs.to_device_events()
        self._changes = self.agent.changes()
        try:
            await self._start()
        except BaseException:
            self._changes.close()
            self._to_device.close()
            if self.engine is not None:
                await self.engine.aclose()
            raise
        return self

    async def _start(self) -> None:
        agent = self.agent
        await agent.wait_joined(self.config.join_timeout_s)
        me = next((p for p in agent.participants if p.is_self), None)
        if me is None:
            raise LocalError("our membership is not among the participants")
        self.encrypted_signalling = self.hs.is_encrypted(agent.room_id) or (
            ("m.room.encryption", "") in self.hs.room_state(agent.room_id)
        )
        mesh_cfg = self.config.mesh
        if not mesh_cfg.ice_servers and self.config.turn_from_homeserver:
            mesh_cfg = replace(mesh_cfg, ice_servers=await self._turn_servers())
        self._mesh_cfg = mesh_cfg
        self.engine = self._new_engine(mesh_session_id(me))
        self._update_members()
        assert self._changes is not None
        assert self._to_device is not None
        self._spawn(self._changes_loop(self._changes), "changes")
        self._spawn(self._to_device_loop(self._to_device), "to-device")
        self._log.info(
            "mesh_link.started",
            session_id=self.engine.local.session_id,
            conf_id=self.engine.local.conf_id,
            olm=self.encrypted_signalling,
            e2ee=self.keys is not None,
        )

    def _new_engine(self, session_id: str) -> MeshEngine:
        local = LocalDevice(
            user_id=self.hs.user_id,
            device_id=self.hs.device_id,
            session_id=session_id,
            conf_id=mesh_conf_id(self.agent.room_id, self.config.slot_id),
        )
        transform = None
        key_sent = None
        if self.keys is not None:
            rings = self.keys.rings
            transform = CryptorTransform(rings.cryptor(self.keys.identity), self._decryptor)
            key_sent = self._key_sent
        engine = MeshEngine(
            local,
            self,
            sources=self._sources,
            encoders=self._encoders,
            config=self._mesh_cfg,
            transform=transform,
            frames=self._frames,
            key_sent=key_sent,
            frame_e2ee=self._frame_e2ee,
        )
        engine.start()
        return engine

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failure: RemoteError | None = None
        try:
            failure = await self._tasks.cancel()
        finally:
            for sub in (self._changes, self._to_device):
                if sub is not None:
                    sub.close()
            try:
                if self.engine is not None:
                    await self.engine.aclose()
            finally:
                # Each engine's close is bounded (its hangups and peer connection closes).
                retired = await self._retiring.join()
                failure = failure or retired
        if failure is not None:
            raise failure

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)

    # -- ToDeviceSender (for the engine) ----------------------------------------------------

    async def send_to_device(
        self, user_id: str, device_id: str, event_type: str, content: Mapping[str, Any]
    ) -> None:
        message = {DeviceRef(user_id, device_id): content}
        try:
            result = await self.hs.send_to_device(event_type, message, encrypted=True)
            protection = signalling_protection(
                room_encrypted=self.encrypted_signalling, peer_has_olm=not result.failed
            )
            if protection is SignallingProtection.PLAINTEXT:
                await self.hs.send_to_device(event_type, message, encrypted=False)
        except MatrixRTCError as e:
            # The engine logs and carries on; the signalling core retries calls that never
            # connect, so one lost message is not fatal.
            self._log.warning("mesh_link.send_failed", type=event_type, error=str(e))
            return
        self.sent[(device_id, protection.value)] += 1
        if protection is SignallingProtection.WITHHELD:
            self._log.warning("mesh_link.undeliverable", type=event_type, device=device_id)

    # -- inputs -----------------------------------------------------------------------------

    async def _changes_loop(self, changes: Subscription[Any]) -> None:
        async for _ in changes:
            me = next((p for p in self.agent.participants if p.is_self), None)
            if self.engine is not None and me is not None:
                session_id = mesh_session_id(me)
                if session_id != self.engine.local.session_id:
                    self._new_session(session_id)
            self._update_members()

    def _new_session(self, session_id: str) -> None:
        """Our membership was replaced by a fresh one (e.g. the delayed leave fired while we
        were cut off, and the agent joined again): peers now address the new session id.

        The old engine is closed in a task of its own. Its close takes seconds when the peers
        are unreachable (a final hangup waits up to 5 s per peer, a peer connection's close up
        to 10 s); awaited here, it held up the changes loop, so the new engine got its members
        only that much later and every change meanwhile waited (chaos bug 2)."""
        self._log.info("mesh_link.new_session", session_id=session_id)
        old = self.engine
        # Swap first, with no await in between, so no to-device event reaches the old engine.
        self.engine = self._new_engine(session_id)
        self.members = {}
        self._conf_ids = {}
        if old is not None:
            self._retiring.spawn(old.aclose(), f"close {old.local.session_id}")

    def refresh_members(self) -> None:
        """Follow the participants again (``admit_new`` may say otherwise now)."""
        if self.engine is not None:
            self._update_members()

    def _update_members(self) -> None:
        assert self.engine is not None
        participants = self.agent.participants
        me = next((p for p in participants if p.is_self), None)
        if me is not None and me.legacy_conf_id is not None:
            self.engine.signalling.accept_conf_id(me.legacy_conf_id)
        everyone = all(_advertises_mesh(p) for p in participants)
        members: dict[DeviceRef, str] = {}
        conf_ids: dict[DeviceRef, str] = {}
        if everyone or not self.config.require_all_mesh:
            for p in participants:
                if _advertises_mesh(p):
                    ref = DeviceRef(p.user_id, p.device_id)
                    members[ref] = mesh_session_id(p)
                    self._identities[ref] = p.rtc_backend_identity
                    if frame_e2ee_with(
                        we_encrypt=self.keys is not None, peer_advertises=p.frame_e2ee
                    ):
                        self._plain_peers.discard(ref)
                    else:
                        self._plain_peers.add(ref)
                    conf = None if me is None else peer_conf_id(me, p)
                    if conf is not None:
                        conf_ids[ref] = conf
        elif self.members:
            self._log.info("mesh_link.not_all_mesh_capable")
        if self._admit_new is not None and not self._admit_new():
            mine = None if me is None else DeviceRef(me.user_id, me.device_id)
            members = {r: sid for r, sid in members.items() if r in self.members or r == mine}
            conf_ids = {ref: c for ref, c in conf_ids.items() if ref in members}
        if members != self.members or conf_ids != self._conf_ids:
            self._log.info("mesh_link.members", count=len(members), legacy=len(conf_ids))
            self.members = members
            self._conf_ids = conf_ids
            self.engine.set_members(members, conf_ids)
        self.member_updates += 1

    async def _to_device_loop(self, events: Subscription[ToDeviceEvent]) -> None:
        async for ev in events:
            if ev.type.startswith(_CALL_EVENT_PREFIXES):
                self._on_call_event(ev)

    def _on_call_event(self, ev: ToDeviceEvent) -> None:
        assert self.engine is not None
        problem = accept_signalling(
            room_encrypted=self.encrypted_signalling,
            encrypted=ev.encrypted,
            claimed_device=ev.content.get("device_id"),
            verified_device=ev.sender_device,
        )
        if problem is not None:
            self.dropped_signalling += 1
            self._log.warning("mesh_link.signalling_dropped", reason=problem, sender=ev.sender)
            return
        self.received[(str(ev.content.get("device_id")), ev.type)] += 1
        self.engine.receive(ev.sender, ev.type, ev.content)

    # -- helpers ----------------------------------------------------------------------------

    def _frame_e2ee(self, peer: DeviceRef) -> bool:
        return self.keys is not None and peer not in self._plain_peers

    def _key_sent(self, peer: DeviceRef, index: int) -> bool:
        # Frames under a key the peer was never sent would only fail there: hold them back.
        assert self.keys is not None
        return self.keys.key_sent_to(peer, index)  # one DeviceRef (model.devices)

    def _decryptor(self, peer: DeviceRef) -> FrameCryptor:
        assert self.keys is not None
        rings = self._decrypt_rings if self._decrypt_rings is not None else self.keys.rings
        identity = self._identities.get(peer) or legacy_identity(peer.user_id, peer.device_id)
        return rings.cryptor(identity)

    async def _turn_servers(self) -> tuple[Any, ...]:
        try:
            body = await self.hs.request("GET", _TURN_PATH)
        except MatrixRTCError as e:
            self._log.info("mesh_link.no_turn_server", error=str(e))
            return ()
        return ice_servers_from_turn_response(body)
