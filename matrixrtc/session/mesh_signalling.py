"""Pure (sans-I/O) MSC2746 full-mesh signalling for one device in one MatrixRTC call.

Theory of operation
-------------------
:class:`MeshSignalling` holds one :class:`PeerCall` per remote device. It performs no I/O and
never sleeps: every input is a method call and returns the :data:`SignallingAction` list the
adapter must carry out (send a to-device message, create an offer, set a remote description,
close a peer connection ...). Time comes from the injected ``clock`` (seconds, monotonic); the
adapter calls :meth:`MeshSignalling.tick` at :meth:`MeshSignalling.next_deadline`.

Inputs: :meth:`set_members` (the session's active mesh members and their session ids),
:meth:`receive` (a to-device ``m.call.*`` event), :meth:`offer_created` /
:meth:`answer_created` / :meth:`local_failed` (results of the adapter's SDP work),
:meth:`media_connected` / :meth:`media_failed` (ICE/DTLS outcome), :meth:`tick`, :meth:`close`.

Rules (shared/spec/mesh.md §1, matrix-js-sdk groupCall.ts / callEventHandler.ts):

* **Who calls whom**: the lower user id calls; for the same user the lower device id calls
  (:func:`wants_outgoing_call`).
* **Glare**: an invite from a device we are still inviting: the lower ``call_id`` wins and the
  loser is hung up with ``replaced``. An invite from a device that already has a call replaces
  that call (js-sdk ``GroupCall.onIncomingCall``).
* **Envelope**: every event we send carries ``call_id``, ``party_id`` (our device id),
  ``version`` "1", ``conf_id``, ``device_id``, ``sender_session_id``, ``dest_session_id`` and a
  ``seq`` counted per call_id and direction from 0 (js-sdk ``MatrixCall.toDeviceSeq``), except
  ``m.call.select_answer``, which goes without ``seq`` and consumes none (see *seq* below).
  Received events must name our ``conf_id`` and our current session in ``dest_session_id`` and
  carry ``device_id``; otherwise they are dropped.
* **Ordering**: received events are delivered per call_id in ``seq`` order. The first number
  of a call is not assumed to be 0: an *opening* event (invite, answer, hangup, reject) or
  ``seq`` 0 fixes it, so a Hydrogen call that starts at its per-device counter is delivered at
  once. Unlike js-sdk (which stalls a call forever on a missing number) a gap is skipped after
  ``gap_timeout_ms``. Events without ``seq`` pass straight through; duplicates are dropped.

seq: how the two deployed peers count (read in their sources)
-------------------------------------------------------------
* **legacy js-sdk** (``call.ts`` ``sendVoipEvent``): one counter per ``MatrixCall``, i.e. per
  call_id and direction, from 0, over *every* event it sends, select_answer included. Its
  receiver (``callEventHandler.onToDeviceEvent``) orders per call_id from 0 with no gap
  skipping, and hands events without ``seq`` straight through.
* **Hydrogen** (``group/Member.ts``): one outbound counter per remote device connection,
  across call_ids (a retry's invite starts at, say, 7). It never sends select_answer or
  reject, and its receiver drops those types *before* its reorder queue
  (``handlesEventType``), whose only tolerance is ``seq <= last processed + 1``: a
  select_answer with a ``seq`` leaves a hole that holds every later message forever.
* **we** send select_answer without ``seq``: js-sdk handles it at once, Hydrogen drops it, and
  neither sees a hole. Everything else is numbered like js-sdk, which Hydrogen's tolerance
  accepts (a new call restarting at 0 is ``<= last + 1``).
* **Invites**: sent with ``lifetime`` 60000; a received invite whose local age exceeds
  ``lifetime - 3000`` is dropped; an outgoing invite unanswered for ``invite_timeout_ms`` is
  hung up with ``invite_timeout``. An invite from a device whose membership we have not seen
  yet is held until the membership arrives (or the invite expires).
* **ICE failure**: aiortc cannot restart ICE, so a failed call is hung up with ``ice_failed``
  and, on the calling side, a new call (new call_id, new peer connection) is placed at once.
* **Retries**: a device we should call but have no call with is called again
  ``retry_interval_ms`` after its last call ended, ``max_retries`` times per device session
  (reset once media connects); after that every ``slow_retry_interval_ms`` for as long as it
  is a member (0: never). Giving up for good left a pair without media for the rest of the
  call once a fault (a lossy link, a long partition) outlasted the fast retries.

Identifying a mesh call inside a MatrixRTC session
--------------------------------------------------
A MatrixRTC session is a (room id, slot id) pair; the default slot is ``m.call#ROOM``. To-device
messages carry no room, so the MSC2746 ``conf_id`` must name both: we use
:func:`mesh_conf_id`, the same opaque hash lk-jwt-service uses as the LiveKit room alias
(SHA-256 over the JSON array ``[room_id, slot_id]``, unpadded base64). It is stable, identical
for every member, at most 43 characters, and lets logs of the mesh and LiveKit transports of
one call be correlated. A member that can do mesh lists :data:`MESH_TRANSPORT` in its
membership's transports *after* any LiveKit transport (Element Call reads ``[0]``); see
:func:`with_mesh_transport`.
"""

from __future__ import annotations

import enum
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from matrixrtc.model.devices import DeviceRef
from matrixrtc.model.livekit_ids import DEFAULT_SLOT_ID, livekit_room_alias
from matrixrtc.model.transports import FULL_MESH_TYPE
from matrixrtc.model.voip import (
    DEFAULT_INVITE_LIFETIME_MS,
    CallAnswer,
    CallCandidates,
    CallEnvelope,
    CallEvent,
    CallHangup,
    CallInvite,
    CallNegotiate,
    CallReject,
    CallSdpStreamMetadataChanged,
    CallSelectAnswer,
    HangupReason,
    IceCandidate,
    SessionDescription,
    StreamMetadata,
    parse_call_event,
)

__all__ = [
    "MESH_TRANSPORT",
    "AddIceCandidates",
    "CallDirection",
    "CallState",
    "ClosePeerConnection",
    "CreateOffer",
    "DeviceRef",
    "LocalDevice",
    "MeshSignalling",
    "PeerCall",
    "RemoteStreamMetadata",
    "SendToDevice",
    "SetRemoteDescription",
    "SignallingAction",
    "SignallingConfig",
    "member_session_id",
    "mesh_conf_id",
    "wants_outgoing_call",
    "with_mesh_transport",
]

log = structlog.get_logger(__name__)

MESH_TRANSPORT: Final[Mapping[str, str]] = {"type": FULL_MESH_TYPE}
# js-sdk drops invites that are about to expire (callEventHandler: localAge > lifetime - 3000).
INVITE_EXPIRY_MARGIN_MS: Final = 3000
_TOMBSTONE_TTL_S: Final = 300.0
_MAX_TOMBSTONES: Final = 1024
_MAX_ORDERED_CALLS: Final = 256


def mesh_conf_id(room_id: str, slot_id: str = DEFAULT_SLOT_ID) -> str:
    """The MSC2746 ``conf_id`` of the mesh call of a MatrixRTC session (room, slot)."""
    return livekit_room_alias(room_id, slot_id)


def member_session_id(member_id: str, created_ts: int) -> str:
    """The MSC2746 session id of a current-dialect membership: the same for every observer,
    new on rejoin (a 2022-dialect member lists its own in ``m.calls``)."""
    return f"{member_id}.{created_ts}"


def with_mesh_transport(transports: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``transports`` with the mesh transport appended after the others (LiveKit stays [0])."""
    others = [t for t in transports if t.get("type") != FULL_MESH_TYPE]
    return [*others, dict(MESH_TRANSPORT)]


def wants_outgoing_call(local: DeviceRef, remote: DeviceRef) -> bool:
    """True when we place the call: the lower user id calls, then the lower device id.

    Same as js-sdk ``wantsOutgoingCall`` and Hydrogen; ``str`` ordering matches JS for ASCII ids.
    """
    if remote.user_id != local.user_id:
        return remote.user_id > local.user_id
    return remote.device_id > local.device_id


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalDevice:
    user_id: str
    device_id: str
    session_id: str
    conf_id: str

    @property
    def ref(self) -> DeviceRef:
        return DeviceRef(self.user_id, self.device_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class SignallingConfig:
    invite_lifetime_ms: int = DEFAULT_INVITE_LIFETIME_MS
    invite_timeout_ms: int = DEFAULT_INVITE_LIFETIME_MS
    gap_timeout_ms: int = 2000
    retry_interval_ms: int = 5000
    max_retries: int = 3
    slow_retry_interval_ms: int = 10_000
    max_buffered_per_call: int = 64


# -- actions (outputs) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SendToDevice:
    """Send ``content`` as a to-device event of ``event_type`` to one device."""

    user_id: str
    device_id: str
    event_type: str
    content: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateOffer:
    """Create a peer connection for ``peer`` and an offer; report via ``offer_created``."""

    call_id: str
    peer: DeviceRef


@dataclass(frozen=True, slots=True, kw_only=True)
class SetRemoteDescription:
    """Apply a remote description. For an offer, create (if needed) the peer connection and an
    answer, and report it via ``answer_created``."""

    call_id: str
    peer: DeviceRef
    description: SessionDescription


@dataclass(frozen=True, slots=True, kw_only=True)
class AddIceCandidates:
    call_id: str
    peer: DeviceRef
    candidates: tuple[IceCandidate, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClosePeerConnection:
    """Close the peer connection of ``call_id`` (the call is over)."""

    call_id: str
    peer: DeviceRef
    reason: HangupReason


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteStreamMetadata:
    """The peer's stream purposes or mute state changed (informational)."""

    call_id: str
    peer: DeviceRef
    metadata: Mapping[str, StreamMetadata]


SignallingAction = (
    SendToDevice
    | CreateOffer
    | SetRemoteDescription
    | AddIceCandidates
    | ClosePeerConnection
    | RemoteStreamMetadata
)


# -- per-call state ------------------------------------------------------------------------


class CallDirection(enum.Enum):
    OUTGOING = "outgoing"
    INCOMING = "incoming"


class CallState(enum.Enum):
    CREATING_OFFER = "creating_offer"  # CreateOffer issued, waiting for offer_created
    INVITE_SENT = "invite_sent"  # waiting for m.call.answer
    ANSWERING = "answering"  # remote offer applied, waiting for answer_created
    CONNECTING = "connecting"  # descriptions exchanged, waiting for ICE/DTLS
    CONNECTED = "connected"  # media flows
    ENDED = "ended"


class _Trigger(enum.Enum):
    OFFER_CREATED = "offer_created"
    ANSWER_RECEIVED = "answer_received"
    ANSWER_CREATED = "answer_created"
    MEDIA_CONNECTED = "media_connected"


# The peer has our description: a metadata change is sent on its own.
_METADATA_STATES: Final = frozenset(
    {CallState.INVITE_SENT, CallState.CONNECTING, CallState.CONNECTED}
)

# Every legal transition but "-> ENDED", which any live state may take.
_TRANSITIONS: Final[Mapping[tuple[CallState, _Trigger], CallState]] = {
    (CallState.CREATING_OFFER, _Trigger.OFFER_CREATED): CallState.INVITE_SENT,
    (CallState.INVITE_SENT, _Trigger.ANSWER_RECEIVED): CallState.CONNECTING,
    (CallState.ANSWERING, _Trigger.ANSWER_CREATED): CallState.CONNECTING,
    (CallState.CONNECTING, _Trigger.MEDIA_CONNECTED): CallState.CONNECTED,
    # aiortc can finish ICE/DTLS before our own answer was handed to signalling.
    (CallState.ANSWERING, _Trigger.MEDIA_CONNECTED): CallState.ANSWERING,
    # Renegotiation (m.call.negotiate) keeps the call where it is.
    (CallState.CONNECTING, _Trigger.ANSWER_CREATED): CallState.CONNECTING,
    (CallState.CONNECTED, _Trigger.ANSWER_CREATED): CallState.CONNECTED,
}


@dataclass(slots=True, kw_only=True)
class PeerCall:
    call_id: str
    peer: DeviceRef
    peer_session_id: str
    direction: CallDirection
    state: CallState
    created_at: float
    invite_sent_at: float | None = None
    renegotiating: bool = False
    remote_metadata: Mapping[str, StreamMetadata] = field(default_factory=dict)
    conf_id: str = ""  # of this call; "" means the local device's
    _send_seq: int = 0

    def next_seq(self) -> int:
        seq = self._send_seq
        self._send_seq += 1
        return seq

    def fire(self, trigger: _Trigger) -> bool:
        new = _TRANSITIONS.get((self.state, trigger))
        if new is None:
            log.info(
                "mesh.call.ignored",
                call_id=self.call_id,
                state=self.state.value,
                trigger=trigger.value,
            )
            return False
        if new is not self.state:
            log.debug("mesh.call.state", call_id=self.call_id, old=self.state.value, new=new.value)
            self.state = new
        return True


@dataclass(slots=True)
class _Received:
    event: CallEvent
    sender: DeviceRef
    local_age_ms: int


@dataclass(slots=True)
class _Reorder:
    """Receive-side ordering for one call_id; ``next_seq`` is None until the first number of
    the call is known (an opening event or seq 0 arrived, or the gap timeout passed)."""

    next_seq: int | None = None
    pending: dict[int, _Received] = field(default_factory=dict)
    gap_since: float | None = None


# The first event a peer sends in a call: an invite (caller), or an answer, hangup or reject
# (callee). Its seq starts the call's sequence, whatever the sender's counter stood at.
_OPENING_EVENTS: Final = (CallInvite, CallAnswer, CallHangup, CallReject)


@dataclass(slots=True)
class _HeldInvite:
    received: _Received
    expires_at: float
    followers: list[_Received] = field(default_factory=list)  # later events of that call


def _default_call_id() -> str:
    return secrets.token_hex(12)


class MeshSignalling:
    """Signalling state of one local device towards every remote mesh member (sans-I/O)."""

    def __init__(
        self,
        local: LocalDevice,
        *,
        clock: Callable[[], float],
        config: SignallingConfig | None = None,
        new_call_id: Callable[[], str] = _default_call_id,
        local_metadata: Callable[[], Mapping[str, StreamMetadata]] = dict,
    ) -> None:
        self.local = local
        self.config = config or SignallingConfig()
        self._clock = clock
        self._new_call_id = new_call_id
        self._local_metadata = local_metadata
        self._members: dict[DeviceRef, str] = {}
        self._conf_ids: dict[DeviceRef, str] = {}  # peers called under another conf_id
        self._accepted_conf_ids: set[str] = {local.conf_id}
        self._calls: dict[str, PeerCall] = {}
        self._by_peer: dict[DeviceRef, str] = {}
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._order: OrderedDict[str, _Reorder] = OrderedDict()
        self._held: dict[DeviceRef, _HeldInvite] = {}
        self._retries: dict[DeviceRef, int] = {}
        self._retry_at: dict[DeviceRef, float] = {}  # when each device is called again
        self._closed = False

    # -- read-only views -------------------------------------------------------------------

    def call_for(self, peer: DeviceRef) -> PeerCall | None:
        call_id = self._by_peer.get(peer)
        return None if call_id is None else self._calls.get(call_id)

    def call(self, call_id: str) -> PeerCall | None:
        return self._calls.get(call_id)

    @property
    def calls(self) -> Mapping[str, PeerCall]:
        return dict(self._calls)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must next run (clock seconds), or None if nothing is pending."""
        cfg = self.config
        times: list[float] = []
        for call in self._calls.values():
            if call.state is CallState.INVITE_SENT and call.invite_sent_at is not None:
                times.append(call.invite_sent_at + cfg.invite_timeout_ms / 1000)
        for order in self._order.values():
            if order.gap_since is not None:
                times.append(order.gap_since + cfg.gap_timeout_ms / 1000)
        times.extend(h.expires_at for h in self._held.values())
        times.extend(self._retry_at.values())
        return min(times) if times else None

    # -- inputs ----------------------------------------------------------------------------

    def accept_conf_id(self, conf_id: str) -> None:
        """Also take events naming ``conf_id`` (the room's 2022 call, once we are listed in
        it: Hydrogen and legacy js-sdk use that call's id)."""
        self._accepted_conf_ids.add(conf_id)

    def set_members(
        self, members: Mapping[DeviceRef, str], conf_ids: Mapping[DeviceRef, str] | None = None
    ) -> list[SignallingAction]:
        """The active mesh members (device → session id) of the session, ourselves included or
        not. Calls to devices that left or changed session end; new devices are called.
        ``conf_ids``: the peers we call under a conf_id other than ours (the room's 2022 call);
        an incoming call keeps the conf_id its invite names."""
        if self._closed:
            return []
        self._conf_ids = dict(conf_ids or {})
        self._accepted_conf_ids.update(self._conf_ids.values())
        me = self.local.ref
        new = {ref: sess for ref, sess in members.items() if ref != me}
        actions: list[SignallingAction] = []
        for ref, old_session in list(self._members.items()):
            if ref not in new:
                self._retries.pop(ref, None)
                self._held.pop(ref, None)
                actions += self._end_peer(ref, HangupReason.USER_HANGUP, notify=True)
            elif new[ref] != old_session:
                self._retries.pop(ref, None)
                actions += self._end_peer(ref, HangupReason.NEW_SESSION, notify=True)
        old = self._members
        self._members = dict(new)
        for ref, session in new.items():
            if old.get(ref) == session:
                continue
            if wants_outgoing_call(me, ref):
                if self.call_for(ref) is None:
                    actions += self._place_call(ref)
            else:
                held = self._held.pop(ref, None)
                if held is not None and held.received.event.envelope.sender_session_id == session:
                    for item in (held.received, *held.followers):
                        actions += self._dispatch(item)
        self._arm_retry()
        return actions

    def receive(
        self, sender_user_id: str, event_type: str, content: object, *, local_age_ms: int = 0
    ) -> list[SignallingAction]:
        """One received to-device event. Invalid or foreign events are logged and dropped."""
        if self._closed:
            return []
        event = parse_call_event(event_type, content)
        if event is None:
            return []
        env = event.envelope
        drop = self._envelope_problem(env)
        if drop is not None:
            log.info("mesh.drop", reason=drop, call_id=env.call_id, sender=sender_user_id)
            return []
        assert env.device_id is not None
        received = _Received(event, DeviceRef(sender_user_id, env.device_id), local_age_ms)
        return self._deliver_in_order(received)

    def offer_created(
        self, call_id: str, sdp: str, metadata: Mapping[str, StreamMetadata] | None = None
    ) -> list[SignallingAction]:
        call = self._calls.get(call_id)
        if call is None or not call.fire(_Trigger.OFFER_CREATED):
            return []
        call.invite_sent_at = self._clock()
        invite = CallInvite(
            envelope=self._envelope(call),
            offer=SessionDescription(type="offer", sdp=sdp),
            lifetime=self.config.invite_lifetime_ms,
            invitee=call.peer.user_id,
            stream_metadata=metadata if metadata is not None else self._local_metadata(),
        )
        return [self._send(call, invite), self._send_end_of_candidates(call)]

    def answer_created(
        self, call_id: str, sdp: str, metadata: Mapping[str, StreamMetadata] | None = None
    ) -> list[SignallingAction]:
        call = self._calls.get(call_id)
        if call is None or not call.fire(_Trigger.ANSWER_CREATED):
            return []
        meta = metadata if metadata is not None else self._local_metadata()
        answer = SessionDescription(type="answer", sdp=sdp)
        if call.renegotiating:
            call.renegotiating = False
            negotiate = CallNegotiate(
                envelope=self._envelope(call),
                description=answer,
                lifetime=self.config.invite_lifetime_ms,
                stream_metadata=meta,
            )
            return [self._send(call, negotiate)]
        event = CallAnswer(envelope=self._envelope(call), answer=answer, stream_metadata=meta)
        return [self._send(call, event), self._send_end_of_candidates(call)]

    def metadata_changed(
        self, call_id: str, metadata: Mapping[str, StreamMetadata]
    ) -> list[SignallingAction]:
        """Our stream metadata changed (a kind muted or unmuted, MSC3291): tell the peer once it
        has had our description; before that, the invite or answer carries the new one."""
        call = self._calls.get(call_id)
        if call is None or call.state not in _METADATA_STATES:
            return []
        event = CallSdpStreamMetadataChanged(
            envelope=self._envelope(call), stream_metadata=metadata
        )
        return [self._send(call, event)]

    def local_failed(self, call_id: str, reason: HangupReason) -> list[SignallingAction]:
        """The adapter failed to create/apply a description for ``call_id``."""
        call = self._calls.get(call_id)
        if call is None:
            return []
        return self._end(call, reason, notify=True)

    def media_connected(self, call_id: str) -> list[SignallingAction]:
        call = self._calls.get(call_id)
        if call is not None and call.fire(_Trigger.MEDIA_CONNECTED):
            self._retries.pop(call.peer, None)
        return []

    def media_failed(self, call_id: str) -> list[SignallingAction]:
        """ICE/DTLS failed. aiortc cannot restart ICE: hang up and place a new call."""
        call = self._calls.get(call_id)
        if call is None:
            return []
        actions = self._end(call, HangupReason.ICE_FAILED, notify=True)
        return actions + self._replace_if_caller(call.peer)

    def tick(self) -> list[SignallingAction]:
        if self._closed:
            return []
        now = self._clock()
        cfg = self.config
        actions: list[SignallingAction] = []
        for call in list(self._calls.values()):
            if (
                call.state is CallState.INVITE_SENT
                and call.invite_sent_at is not None
                and now >= call.invite_sent_at + cfg.invite_timeout_ms / 1000
            ):
                actions += self._end(call, HangupReason.INVITE_TIMEOUT, notify=True)
        for call_id, order in list(self._order.items()):
            if order.gap_since is not None and now >= order.gap_since + cfg.gap_timeout_ms / 1000:
                skipped_to = min(order.pending)
                log.info(
                    "mesh.seq_gap_skipped",
                    call_id=call_id,
                    missing_from=order.next_seq,
                    resume_at=skipped_to,
                )
                order.next_seq = skipped_to
                actions += self._drain(order)
        for ref, held in list(self._held.items()):
            if now >= held.expires_at:
                del self._held[ref]
                log.info("mesh.held_invite_expired", call_id=held.received.event.call_id)
        for ref, due in list(self._retry_at.items()):
            if now >= due:
                del self._retry_at[ref]
                self._retries[ref] = self._retries.get(ref, 0) + 1
                log.info("mesh.retry", peer=ref.device_id, attempt=self._retries[ref])
                actions += self._place_call(ref)
        while self._ended and next(iter(self._ended.values())) + _TOMBSTONE_TTL_S < now:
            self._ended.popitem(last=False)
        self._arm_retry()
        return actions

    def close(self) -> list[SignallingAction]:
        """Leave: hang up every call (user_hangup)."""
        actions: list[SignallingAction] = []
        for call in list(self._calls.values()):
            actions += self._end(call, HangupReason.USER_HANGUP, notify=True)
        self._closed = True
        self._held.clear()
        self._retry_at.clear()
        return actions

    # -- receive path ----------------------------------------------------------------------

    def _envelope_problem(self, env: CallEnvelope) -> str | None:
        if env.device_id is None:
            return "no device_id"  # js-sdk drops these too
        if env.conf_id not in self._accepted_conf_ids:
            return "conf_id is not our call"
        if env.dest_session_id != self.local.session_id:
            return "dest_session_id is not our session"
        return None

    def _deliver_in_order(self, received: _Received) -> list[SignallingAction]:
        seq = received.event.envelope.seq
        if seq is None:
            return self._dispatch(received)
        call_id = received.event.call_id
        order = self._order.get(call_id)
        if order is None:
            order = self._order[call_id] = _Reorder()
            while len(self._order) > _MAX_ORDERED_CALLS:
                self._order.popitem(last=False)
        if (order.next_seq is not None and seq < order.next_seq) or seq in order.pending:
            log.info("mesh.drop", reason="duplicate seq", call_id=call_id, seq=seq)
            return []
        if len(order.pending) >= self.config.max_buffered_per_call:
            log.info("mesh.drop", reason="reorder buffer full", call_id=call_id, seq=seq)
            return []
        if order.next_seq is None and (seq == 0 or isinstance(received.event, _OPENING_EVENTS)):
            # The call's first number: anything buffered below it cannot belong to the call.
            order.next_seq = seq
            for stale in [n for n in order.pending if n < seq]:
                log.info("mesh.drop", reason="before the opening event", call_id=call_id, seq=stale)
                del order.pending[stale]
        order.pending[seq] = received
        return self._drain(order)

    def _drain(self, order: _Reorder) -> list[SignallingAction]:
        actions: list[SignallingAction] = []
        advanced = False
        while order.next_seq is not None and order.next_seq in order.pending:
            item = order.pending.pop(order.next_seq)
            order.next_seq += 1
            advanced = True
            actions += self._dispatch(item)
        if not order.pending:
            order.gap_since = None
        elif advanced or order.gap_since is None:
            order.gap_since = self._clock()  # a new gap: its own full timeout
        return actions

    def _dispatch(self, r: _Received) -> list[SignallingAction]:
        event = r.event
        if isinstance(event, CallInvite):
            return self._on_invite(r, event)
        call = self._calls.get(event.call_id)
        if call is None or call.peer != r.sender:
            held = self._held.get(r.sender)
            if held is not None and held.received.event.call_id == event.call_id:
                if len(held.followers) < self.config.max_buffered_per_call:
                    held.followers.append(r)
                return []
            if event.call_id not in self._ended:
                log.info("mesh.drop", reason="unknown call", call_id=event.call_id)
            return []
        if isinstance(event, CallAnswer):
            return self._on_answer(call, event)
        if isinstance(event, CallSelectAnswer):
            if event.selected_party_id != self.local.device_id:
                return self._end(call, HangupReason.ANSWERED_ELSEWHERE, notify=False)
            return []
        if isinstance(event, CallCandidates):
            return [
                AddIceCandidates(call_id=call.call_id, peer=call.peer, candidates=event.candidates)
            ]
        if isinstance(event, CallNegotiate):
            return self._on_negotiate(call, event)
        if isinstance(event, CallHangup):
            actions = self._end(call, event.reason, notify=False)
            if event.reason == HangupReason.ICE_FAILED:
                actions += self._replace_if_caller(call.peer)
            return actions
        if isinstance(event, CallReject):
            if call.direction is CallDirection.OUTGOING and call.state is CallState.INVITE_SENT:
                return self._end(call, HangupReason.USER_BUSY, notify=False)
            return []
        if isinstance(event, CallSdpStreamMetadataChanged):
            call.remote_metadata = event.stream_metadata
            return [
                RemoteStreamMetadata(
                    call_id=call.call_id, peer=call.peer, metadata=event.stream_metadata
                )
            ]
        return []

    def _on_invite(self, r: _Received, invite: CallInvite) -> list[SignallingAction]:
        if invite.call_id in self._calls or invite.call_id in self._ended:
            log.info("mesh.drop", reason="invite for a known call", call_id=invite.call_id)
            return []
        remaining_ms = invite.lifetime - r.local_age_ms
        if r.local_age_ms > invite.lifetime - INVITE_EXPIRY_MARGIN_MS:
            log.info("mesh.drop", reason="invite expired", call_id=invite.call_id)
            return []
        session = invite.envelope.sender_session_id
        if session is None or self._members.get(r.sender) != session:
            # The membership may simply not have reached us yet: hold the latest invite.
            log.info("mesh.invite_held", call_id=invite.call_id, peer=r.sender.device_id)
            self._held[r.sender] = _HeldInvite(r, self._clock() + remaining_ms / 1000)
            return []
        actions: list[SignallingAction] = []
        existing = self.call_for(r.sender)
        if existing is not None:
            glare = existing.direction is CallDirection.OUTGOING and existing.state in (
                CallState.CREATING_OFFER,
                CallState.INVITE_SENT,
            )
            if glare and invite.call_id > existing.call_id:
                # Our pending call wins: refuse theirs.
                loser = self._new_call(
                    invite.call_id, r.sender, session, CallDirection.INCOMING, CallState.ENDED
                )
                loser.conf_id = invite.envelope.conf_id or ""
                self._tombstone(loser.call_id)
                hangup = CallHangup(envelope=self._envelope(loser), reason=HangupReason.REPLACED)
                return [self._send(loser, hangup)]
            # An offer never sent needs no hangup.
            notify = existing.state is not CallState.CREATING_OFFER
            actions += self._end(existing, HangupReason.REPLACED, notify=notify)
        call = self._new_call(
            invite.call_id, r.sender, session, CallDirection.INCOMING, CallState.ANSWERING
        )
        call.conf_id = invite.envelope.conf_id or ""
        call.remote_metadata = invite.stream_metadata
        self._register(call)
        actions.append(
            SetRemoteDescription(call_id=call.call_id, peer=call.peer, description=invite.offer)
        )
        return actions

    def _on_answer(self, call: PeerCall, answer: CallAnswer) -> list[SignallingAction]:
        if call.direction is not CallDirection.OUTGOING or not call.fire(_Trigger.ANSWER_RECEIVED):
            return []
        call.remote_metadata = answer.stream_metadata
        # Without seq: Hydrogen drops select_answer unqueued, so a numbered one would leave a
        # hole in its sequence that holds every later message (the hangup too).
        select = CallSelectAnswer(
            envelope=self._envelope(call, numbered=False),
            selected_party_id=answer.envelope.party_id,
        )
        return [
            SetRemoteDescription(call_id=call.call_id, peer=call.peer, description=answer.answer),
            self._send(call, select),
        ]

    def _on_negotiate(self, call: PeerCall, negotiate: CallNegotiate) -> list[SignallingAction]:
        if call.state not in (CallState.CONNECTING, CallState.CONNECTED):
            log.info("mesh.drop", reason="negotiate before answer", call_id=call.call_id)
            return []
        # We never send negotiate offers ourselves, so there is no renegotiation glare.
        if negotiate.description.type == "offer":
            call.renegotiating = True
        call.remote_metadata = negotiate.stream_metadata or call.remote_metadata
        return [
            SetRemoteDescription(
                call_id=call.call_id, peer=call.peer, description=negotiate.description
            )
        ]

    # -- helpers ---------------------------------------------------------------------------

    def _new_call(
        self,
        call_id: str,
        peer: DeviceRef,
        session: str,
        direction: CallDirection,
        state: CallState,
    ) -> PeerCall:
        return PeerCall(
            call_id=call_id,
            peer=peer,
            peer_session_id=session,
            direction=direction,
            state=state,
            created_at=self._clock(),
        )

    def _register(self, call: PeerCall) -> None:
        self._calls[call.call_id] = call
        self._by_peer[call.peer] = call.call_id
        self._retry_at.pop(call.peer, None)  # a call is under way: no retry is due

    def _place_call(self, peer: DeviceRef) -> list[SignallingAction]:
        session = self._members.get(peer)
        if session is None or self._closed:
            return []
        call = self._new_call(
            self._new_call_id(), peer, session, CallDirection.OUTGOING, CallState.CREATING_OFFER
        )
        call.conf_id = self._conf_ids.get(peer, "")
        self._register(call)
        log.info("mesh.place_call", call_id=call.call_id, peer=peer.device_id)
        return [CreateOffer(call_id=call.call_id, peer=peer)]

    def _replace_if_caller(self, peer: DeviceRef) -> list[SignallingAction]:
        if peer not in self._members or not wants_outgoing_call(self.local.ref, peer):
            return []
        if self.call_for(peer) is not None:
            return []
        return self._place_call(peer)

    def _end_peer(
        self, peer: DeviceRef, reason: HangupReason, *, notify: bool
    ) -> list[SignallingAction]:
        call = self.call_for(peer)
        return [] if call is None else self._end(call, reason, notify=notify)

    def _end(self, call: PeerCall, reason: HangupReason, *, notify: bool) -> list[SignallingAction]:
        if call.state is CallState.ENDED:
            return []
        log.info("mesh.call_ended", call_id=call.call_id, peer=call.peer.device_id, reason=reason)
        actions: list[SignallingAction] = []
        if notify:
            hangup = CallHangup(envelope=self._envelope(call), reason=reason)
            actions.append(self._send(call, hangup))
        call.state = CallState.ENDED
        self._calls.pop(call.call_id, None)
        if self._by_peer.get(call.peer) == call.call_id:
            del self._by_peer[call.peer]
        self._tombstone(call.call_id)
        actions.append(ClosePeerConnection(call_id=call.call_id, peer=call.peer, reason=reason))
        self._arm_retry()
        return actions

    def _tombstone(self, call_id: str) -> None:
        self._ended[call_id] = self._clock()
        self._ended.move_to_end(call_id)
        while len(self._ended) > _MAX_TOMBSTONES:
            self._ended.popitem(last=False)

    def _retry_delay_s(self, ref: DeviceRef) -> float | None:
        """How long after a call to ``ref`` ended it is called again (None: not again)."""
        cfg = self.config
        if self._retries.get(ref, 0) < cfg.max_retries:
            return cfg.retry_interval_ms / 1000
        return cfg.slow_retry_interval_ms / 1000 if cfg.slow_retry_interval_ms > 0 else None

    def _retry_candidates(self) -> list[DeviceRef]:
        me = self.local.ref
        return [
            ref
            for ref in self._members
            if wants_outgoing_call(me, ref)
            and self.call_for(ref) is None
            and self._retry_delay_s(ref) is not None
        ]

    def _arm_retry(self) -> None:
        """A due time for every device to call again, none for the others."""
        wanted = set() if self._closed else set(self._retry_candidates())
        for ref in list(self._retry_at):
            if ref not in wanted:
                del self._retry_at[ref]
        for ref in wanted:
            if ref not in self._retry_at:
                delay = self._retry_delay_s(ref)
                assert delay is not None  # a candidate has one
                self._retry_at[ref] = self._clock() + delay

    def _envelope(self, call: PeerCall, *, numbered: bool = True) -> CallEnvelope:
        return CallEnvelope(
            call_id=call.call_id,
            party_id=self.local.device_id,
            version="1",
            conf_id=call.conf_id or self.local.conf_id,
            device_id=self.local.device_id,
            sender_session_id=self.local.session_id,
            dest_session_id=call.peer_session_id,
            seq=call.next_seq() if numbered else None,
        )

    def _send(self, call: PeerCall, event: CallEvent) -> SendToDevice:
        return SendToDevice(
            user_id=call.peer.user_id,
            device_id=call.peer.device_id,
            event_type=str(event.event_type),
            content=event.to_content(),
        )

    def _send_end_of_candidates(self, call: PeerCall) -> SendToDevice:
        # aiortc has no trickle ICE: every candidate is already in the SDP.
        event = CallCandidates(
            envelope=self._envelope(call), candidates=(IceCandidate(candidate=""),)
        )
        return self._send(call, event)
