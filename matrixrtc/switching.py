"""Live mesh ↔ SFU switching for one call member (design.md principle 5).

``async with MediaSwitcher(agent, keys, SwitchConfig(mesh_max=3)) as switcher`` (inside the
agent's and the keys' blocks) runs the call's media over whichever transport the pure policy
(:func:`matrixrtc.session.media_policy.choose_media_for`) picks for the agent's active
memberships: a :class:`~matrixrtc.mesh.matrix_link.MatrixMesh` or a
:class:`~matrixrtc.livekit.transport.LiveKitTransport`, each behind the
:class:`~matrixrtc.media_transport.MediaTransport` protocol (the switcher knows no transport by
name: ``SwitchConfig.transports`` maps each decision to a factory). Our SFU is the LiveKit
transport the agent advertises (``AgentConfig.transports[0]``); the mesh transport must be
advertised after it for the policy to pick mesh.

Switching is make-before-break (the rules are the pure machine
:class:`matrixrtc.session.handover.Handover`): when the decision changes, the new transport is
brought up (connected, publishing, subscribed, keyed) while the old one keeps carrying media.
Each remote member is **cut over** on its own the moment the new transport has delivered a
decoded (so decrypted: a key frame through the frame cryptor) frame from it: from then on its
frames are taken from the new transport (:meth:`MediaSwitcher.via`, the ``frames`` tap, the gap
figures), before that from the old one. At each cutover we tell that member so (an
Olm-encrypted to-device :data:`SWITCH_ACK_TYPE`: "I receive you over sfu/mesh", counted only
from the verified device of a current member of the call; also later,
while the switch is recent, for a member the handover had not cut over yet). The old transport
is torn down only once every remote member is cut over **and** each one the old transport
carried has told us it receives us over the new one (or ``ack_timeout_s`` after its cutover,
for a member that sends no such message; ``settle_timeout_s`` bounds the whole overlap):
tearing ours down stops our media to them on it. A start (or a member joining a steady call)
sends none: nobody is waiting for it. Every member computes the same decision from the same
membership list, so all switch at about the same time and nobody leads; the acknowledgements
make each wait for the slowest. Keys come from :class:`~matrixrtc.call_keys.CallKeys` on both
transports (one key path: the key manager pushes every key to each transport's sink as the
transport is built), so the new path decrypts from its first frame.

Reports: :attr:`MediaSwitcher.history` (one :class:`SwitchRecord` per start or switch, with
reason and duration), :attr:`MediaSwitcher.peers` (per remote device: frames seen over each
transport and the largest gap between two consecutive video frames of the transport it is
taken from, i.e. what a receiver shows) and :attr:`MediaSwitcher.gaps` (the latest inter-frame
gaps, for figures around a switch). Frames are observed by polling the transports' decoded
frame counters every ``poll_s`` while a switch is under way (``idle_poll_s`` between
switches); each counter keeps its frames' times, so every gap between
two consecutive frames is measured, however many a poll sees at once (a counter without times:
from the previous frame to the newest, which can only overstate). A frame makes or closes a
gap only if it came over the transport the member was taken from *at the frame's time* (its
latest cutover at or before it): counters report frames after they were decoded, so an
old-path frame decoded just before a cutover may be seen after it, and then splits the gap it
fell into. At a cutover the new path's latest frame is what the member shows (a frame at the
cutover's time). Frames over another transport are counted but make no gap and close none.

SFU failure: when the transport carrying our media reports it has lost its server
(:meth:`MediaTransport.failing`) for ``fail_after_s``, that kind counts as unreachable and
the policy is asked again with ``sfu_reachable=False`` (a call whose members can all mesh moves
to the mesh, make-before-break as ever). Every ``probe_s`` the kind's probe
(``SwitchConfig.probes``) asks whether it could work again; once it says so the policy decides
as before, and the call moves back. The web client (web/src/call.ts) does the same with the
same delays, so a browser and a Python member fall back and return together.

Leaving: after the agent sent our leave, when that leave moves the others from the SFU we are
on to the mesh, the block's exit stays connected to the SFU, sending nothing
(:meth:`MediaTransport.hush`), for ``leave_linger_s`` before closing: LiveKit reshuffles its
forwarding when a participant disconnects, and the others' old path should not go through
that while their mesh comes up.

Every task is owned and cancelled on exit; leaving the block tears down the running transport.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import structlog
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.agent import CallAgent, Participant, ParticipantsChanged
from matrixrtc.call_keys import CallKeys
from matrixrtc.errors import LocalError, MatrixRTCError
from matrixrtc.livekit.connection import MediaOptions
from matrixrtc.matrix import Broadcaster, Subscription, ToDeviceEvent
from matrixrtc.media.frames import FrameTap, TapFrame
from matrixrtc.media_transport import (
    DEFAULT_PROBES,
    DEFAULT_TRANSPORTS,
    FrameCounter,
    MediaEngine,
    MediaTransport,
    TransportContext,
    TransportFactory,
    TransportProbe,
)
from matrixrtc.media_transport.local_media import LocalEncoders
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.mesh.matrix_link import MeshLinkConfig
from matrixrtc.model.rejections import RejectionLog
from matrixrtc.session.handover import (
    Abandon,
    Cutover,
    Finish,
    Handover,
    HandoverAction,
    HandoverConfig,
)
from matrixrtc.session.media_policy import (
    DEFAULT_MESH_MAX,
    MediaDecision,
    MediaKind,
    choose_media,
)
from matrixrtc.session.mesh_signalling import DeviceRef, SignallingConfig
from matrixrtc.tasks import OwnedTasks

__all__ = [
    "SWITCH_ACK_TYPE",
    "SWITCH_MESH",
    "GapRecord",
    "MediaSwitcher",
    "PeerMedia",
    "SwitchConfig",
    "SwitchRecord",
]

log = structlog.get_logger(__name__)

_MAX_GAP_RECORDS: Final = 8192  # every inter-frame gap is kept; at 15 fps × 3 peers, ~3 min
_SHOWN_KEPT: Final = 64  # per peer: a frame reported late is placed among these

# To-device, Olm-encrypted: "I receive your media over ``kind``" (content: ``room_id``,
# ``kind`` "mesh" / "sfu"). Project-private (no MSC defines a switch); others ignore it.
SWITCH_ACK_TYPE: Final = "org.matrixrtc.media_received"


# Members start their mesh when each sees the membership change, so a caller's invite can reach
# a callee a moment before the callee listens: call again within seconds, not after the 60 s
# invite lifetime (the old transport carries media meanwhile).
SWITCH_MESH: Final = MeshLinkConfig(
    mesh=MeshConfig(signalling=SignallingConfig(invite_timeout_ms=4000, retry_interval_ms=1000))
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchConfig:
    mesh_max: int = DEFAULT_MESH_MAX
    media: MediaOptions = field(default_factory=MediaOptions)  # what we send on either transport
    mesh: MeshLinkConfig = field(default_factory=lambda: SWITCH_MESH)
    # Our local tracks: called once by the shared encoders (share_encoders, the default),
    # which stop them when the switcher closes; else by each transport we start, which stops
    # its own on close (the SDK engine always does so). None: synthetic video and a tone.
    sources: Callable[[], Sequence[MediaStreamTrack]] | None = None
    # One encoder per kind for the switcher's lifetime, shared by the transports that can
    # (the mesh; the SFU on the aiortc engine without simulcast), so the overlap of a switch
    # encodes each frame once (see matrixrtc.media_transport.local_media). False: each
    # transport encodes its own copy (the behaviour before, for A/B figures).
    share_encoders: bool = True
    settle_timeout_s: float = 10.0  # longest make-before-break overlap
    # After a member's cutover, longest wait for it to say it receives us over the new path.
    ack_timeout_s: float = 3.0
    # False: send no acknowledgements and wait for none (tear the old path down once every
    # member is cut over: the behaviour before them, for A/B figures in bench/join.py).
    acks: bool = True
    join_timeout_s: float = 30.0  # until the room shows our own membership
    poll_s: float = 0.02
    # Between switches (no handover, no acknowledgement due) the frame counters are polled
    # this often: they keep their frames' times, so every gap is still measured, and a
    # 12-member call spent ~2.5 % of a participant's CPU polling every ``poll_s``.
    idle_poll_s: float = 0.1
    # A switch (not a start) begins rank × step after the decision, our rank being our
    # device's place among the call's (from the highest on a switch to the mesh), the step
    # ``stagger_s`` or less so that the last member waits at most ``stagger_max_s``: every
    # member decides at once (the same membership change), and bringing up every new path
    # together stalled the old ones' media.
    stagger_s: float = 0.2
    stagger_max_s: float = 0.6
    retry_s: float = 2.0  # pause after a transport failed to start
    close_timeout_s: float = 15.0  # longest wait for an old transport to close
    # After we left the call, when our leave moves the others off the SFU we are on: stay
    # connected to it this long, sending nothing (see MediaSwitcher.__aexit__).
    leave_linger_s: float = 1.0
    # What runs for each decision of the policy (matrixrtc.media_transport).
    transports: Mapping[MediaKind, TransportFactory] = field(
        default_factory=lambda: dict(DEFAULT_TRANSPORTS)
    )
    fail_after_s: float = 1.0  # a transport failing this long: its kind is unreachable
    probe_s: float = 2.0  # how often an unreachable kind is probed
    probes: Mapping[MediaKind, TransportProbe] = field(default_factory=lambda: dict(DEFAULT_PROBES))


@dataclass(frozen=True, slots=True)
class SwitchRecord:
    """One transport start (``old`` None) or switch. Times are ``time.monotonic`` seconds."""

    old: MediaKind | None
    new: MediaKind
    reason: str
    members: int
    started_at: float
    finished_at: float  # the old transport was detached (closing goes on in the background)
    carried_at: float | None  # the new transport had media from every peer; None: timed out
    handover: str = ""  # how the overlap ended (matrixrtc.session.handover.Finish.reason)

    @property
    def duration_s(self) -> float:
        return self.finished_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.old.value if self.old is not None else None,
            "to": self.new.value,
            "reason": self.reason,
            "members": self.members,
            "duration_ms": round(self.duration_s * 1000),
            "complete": self.carried_at is not None,
            "handover": self.handover,
        }


@dataclass(frozen=True, slots=True)
class GapRecord:
    """A stretch without video from one peer over any transport."""

    peer: DeviceRef
    start: float  # arrival of the last frame before the gap
    end: float  # arrival of the first frame seen after it
    transport: MediaKind  # what carried the frame that ended the gap

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class PeerMedia:
    """Video from one remote device, over every transport."""

    peer: DeviceRef
    frames: dict[MediaKind, int] = field(default_factory=dict)
    first_frame_at: float | None = None
    last_frame_at: float | None = None
    max_gap_s: float = 0.0  # largest gap between two frames seen (an open gap is not counted)
    via: MediaKind | None = None  # the transport its frames are taken from (at the last poll)
    cut_at: dict[MediaKind, float] = field(default_factory=dict)  # latest cutover to each kind
    shown: list[float] = field(default_factory=list)  # the latest frames shown, oldest first

    def open_gap_s(self, now: float) -> float:
        return 0.0 if self.last_frame_at is None else max(0.0, now - self.last_frame_at)


def _shown_via(peer: PeerMedia, at: float, now: MediaKind | None) -> MediaKind | None:
    """The transport ``peer`` was taken from at time ``at``: the one of its latest cutover
    at or before ``at``; ``now`` (the current one) before any."""
    shown, since = now, float("-inf")
    for kind, cut in peer.cut_at.items():
        if since < cut <= at:
            shown, since = kind, cut
    return shown


@dataclass(slots=True)
class _Source:
    """One counter we poll; ``obj`` keeps it alive so its id() is not reused."""

    obj: object
    count: int


class MediaSwitcher:
    """See the module docstring."""

    def __init__(
        self,
        agent: CallAgent,
        keys: CallKeys | None,
        config: SwitchConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        frames: FrameTap[tuple[Participant, MediaKind]] | None = None,
    ) -> None:
        """``frames``: every decoded remote frame, with its sender and the transport that
        carried it; during a switch, a member's frames come from the transport it is taken
        from (:meth:`via`), so the tap sees one stream per member, never both."""
        self.agent = agent
        self.keys = keys
        self.config = config or SwitchConfig()
        self._frames: FrameTap[tuple[Participant, MediaKind]] | None = None
        if frames is not None:
            outer = frames
            self._frames = FrameTap(
                lambda key, frame: self._tap(outer, key, frame),
                lambda: outer.listening,
                lambda: outer.listening_encoded,
            )
        self._records: Broadcaster[SwitchRecord] = Broadcaster()
        self._clock = clock
        self.current: MediaTransport | None = None  # carries our media now
        self._starting: MediaTransport | None = None  # being brought up by a switch
        self.decision: MediaDecision | None = None
        self.history: list[SwitchRecord] = []
        self.peers: dict[DeviceRef, PeerMedia] = {}
        self.gaps: collections.deque[GapRecord] = collections.deque(maxlen=_MAX_GAP_RECORDS)
        self._sources: dict[int, _Source] = {}
        cfg = self.config
        self._encoders = (
            LocalEncoders(
                cfg.media,
                sources=cfg.sources,
                keys=keys,
                queue_frames=cfg.mesh.mesh.send_queue_frames,
            )
            if cfg.share_encoders
            else None
        )
        self._dirty = asyncio.Event()
        self._settled = asyncio.Event()
        self._tasks = OwnedTasks("switch", log, event_prefix="switch")
        # Old transports being closed: awaited (never cancelled) when the switcher closes.
        self._teardowns = OwnedTasks("switch-teardown", log, event_prefix="switch.teardown")
        self._changes: Subscription[ParticipantsChanged] | None = None
        self._to_device: Subscription[ToDeviceEvent] | None = None
        self.unreachable: set[MediaKind] = set()  # kinds whose transport failed, not yet back
        self._failing_since: float | None = None
        self._handover: Handover | None = None  # the switch in progress
        self._handing_to: MediaTransport | None = None  # the transport it brings up
        # Members cut over in the switch in progress: the old transport decodes them no more.
        self._hidden: set[DeviceRef] = set()
        # Acknowledgements received: (device, kind) → when (our clock).
        self._acks: dict[tuple[DeviceRef, MediaKind], float] = {}
        # Per running transport (by id; it is kept alive by _running): when it started and
        # which members we told that it delivers their media.
        self._acked: dict[int, tuple[MediaTransport, float, set[DeviceRef]]] = {}
        self._poll_soon = asyncio.Event()  # wakes the monitor from an idle poll's wait
        # Acknowledgements due, sent together at the end of each poll (one request each kind).
        self._ack_outbox: dict[MediaKind, list[DeviceRef]] = {}
        self._ack_rejections = RejectionLog(clock=clock)  # a line per sender a minute
        self._log = log.bind(room_id=agent.room_id, user_id=agent.hs.user_id)

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._changes = self.agent.changes()
        self._spawn(self._changes_loop(self._changes), "changes")
        if self.config.acks:
            self._to_device = self.agent.hs.to_device_events()
            self._spawn(self._ack_loop(self._to_device), "acks")
        self._spawn(self._drive(), "drive")
        self._spawn(self._monitor(), "monitor")
        self._spawn(self._probe_loop(), "probe")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failure: MatrixRTCError | None = await self._tasks.cancel()
        if exc_type is None:
            await self._linger()  # no switch of ours starts meanwhile: the tasks are gone
        for sub in (self._changes, self._to_device):
            if sub is not None:
                sub.close()
        teardown_failure = await self._teardowns.join()  # each bounded by close_timeout_s
        failure = failure or teardown_failure
        for t in self._running():
            try:
                await t.aclose()
            except MatrixRTCError as exc:  # close every transport; raise the first failure
                self._log.error("switch.close_failed", transport=t.kind.value, error=repr(exc))
                failure = failure or exc
        self.current = self._starting = None
        if self._encoders is not None:
            try:
                await self._encoders.aclose()
            except MatrixRTCError as exc:
                self._log.error("switch.encoders_close_failed", error=repr(exc))
                failure = failure or exc
        self._records.end()
        if failure is not None:
            raise failure

    async def _linger(self) -> None:
        """We left the call (the agent sent our leave) and that moves the others from the SFU
        we are on to the mesh: stay connected, sending nothing, for ``leave_linger_s`` before
        closing. LiveKit reshuffles its forwarding when a participant disconnects (it asks
        every publisher for a key frame for the leaver's closing subscriptions); the others'
        old path went through that while their mesh came up, and frames were held in LiveKit
        for up to 390 ms (bench/switch.py). Leaving the SFU after them, their switch does not
        see it (SFU->mesh median 96 -> 88 ms, alternated in one session)."""
        t, linger = self.current, self.config.leave_linger_s
        if linger <= 0 or t is None or t.kind is not MediaKind.SFU or self.agent.in_call:
            return
        remote = self._remote()
        after = choose_media(
            (p.advertised for p in remote),
            self.config.mesh_max,
            sfu_reachable=MediaKind.SFU not in self.unreachable,
        )
        if len(remote) < 2 or after.kind is not MediaKind.MESH:
            return  # nobody left to switch, or they stay on the SFU
        self._log.info("switch.leave_linger", s=linger, members=len(remote))
        t.hush()
        await asyncio.sleep(linger)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)

    # -- public view ------------------------------------------------------------------------

    @property
    def kind(self) -> MediaKind | None:
        """The kind of transport carrying our media now (None before the first one)."""
        return self.current.kind if self.current is not None else None

    @property
    def engine(self) -> MediaEngine | None:
        """What runs the transport carrying our media now (None before the first one)."""
        return self.current.engine if self.current is not None else None

    @property
    def local_encoders(self) -> LocalEncoders | None:
        """The encoders every transport that can shares (None: ``share_encoders`` off)."""
        return self._encoders

    def running(self, kind: MediaKind) -> MediaTransport | None:
        """The running transport of ``kind`` (carrying media, or being switched to)."""
        return next((t for t in self._running() if t.kind is kind), None)

    def via(self, peer: DeviceRef) -> MediaKind | None:
        """The transport ``peer``'s media is taken from now: during a switch the old one
        until the new one has delivered it, then the new one; else the current one."""
        h = self._handover
        if h is not None:
            return h.via(peer) or h.new  # a start: whatever delivers it
        return self.kind

    def switches(self) -> Subscription[SwitchRecord]:
        """Subscribe to transport starts and switches as they complete."""
        return self._records.subscribe()

    async def wait_settled(self, kind: MediaKind, timeout_s: float) -> SwitchRecord:
        """Until ``kind`` alone carries our media (after a start or switch to it)."""
        async with asyncio.timeout(timeout_s):
            while True:
                self._settled.clear()
                if self.kind is kind and self.history and self.history[-1].new is kind:
                    return self.history[-1]
                await self._settled.wait()

    def refresh(self) -> None:
        """Take in every frame the running transports have counted up to now. Frames are
        otherwise seen at the next poll (``poll_s``), after the transport's own fold of its
        counts (the aiortc SFU engine's every 50 ms): a gap judged still open from that view
        is overstated by up to both (bench/switch.py: before, 6 of 18 runs' largest mesh->SFU
        gap was such an open gap at the leave, 96-116 ms; after, none of 24)."""
        try:
            for t in self._running():
                t.refresh()
            self._poll()
        except Exception as exc:  # a transport closing under our feet: the view stays
            self._log.warning("switch.refresh_failed", error=repr(exc))

    def max_gap_s(self, since: float | None = None, until: float | None = None) -> float:
        """Largest video gap from any peer; with bounds, among gaps overlapping them. Without
        ``until``, a gap still open now counts too, for each member still in the call that has
        sent video before (media that stopped for good is the largest gap of all), judged
        after :meth:`refresh`."""
        lo = float("-inf") if since is None else since
        hi = float("inf") if until is None else until
        best = 0.0
        if until is None:
            self.refresh()
            now = self._clock()
            for ref in self._remote_refs():
                seen = self.peers.get(ref)
                if seen is not None and seen.last_frame_at is not None:
                    best = max(best, seen.open_gap_s(now))
        if since is None and until is None:
            best = max((p.max_gap_s for p in self.peers.values()), default=0.0)
        for g in self.gaps:
            if g.end >= lo and g.start <= hi:
                best = max(best, g.seconds)
        return best

    def report(self) -> dict[str, Any]:
        """History and per-peer figures, JSON-ready."""
        return {
            "transport": self.kind.value if self.kind is not None else None,
            "switches": [r.to_json() for r in self.history],
            "peers": {
                f"{p.peer.user_id}|{p.peer.device_id}": {
                    "frames": {k.value: n for k, n in p.frames.items()},
                    "max_gap_ms": round(p.max_gap_s * 1000),
                }
                for p in self.peers.values()
            },
        }

    # -- inputs -----------------------------------------------------------------------------

    async def _changes_loop(self, changes: Subscription[ParticipantsChanged]) -> None:
        async for _ in changes:
            self._dirty.set()

    async def _ack_loop(self, events: Subscription[ToDeviceEvent]) -> None:
        """Record each member's "I receive you over <kind>": only from the Olm-verified
        device of a current member of this call (any other device could otherwise make us
        tear the old path down early). Others are logged once per sender per minute."""
        async for ev in events:
            if ev.type != SWITCH_ACK_TYPE or not ev.encrypted or ev.sender_device is None:
                continue
            content = ev.content
            if content.get("room_id") != self.agent.room_id:
                continue
            ref = DeviceRef(ev.sender, ev.sender_device)
            try:
                kind = MediaKind(str(content.get("kind")))
            except ValueError:
                self._ack_ignored(ref, "unknown kind", kind=str(content.get("kind"))[:32])
                continue
            if ref not in self._remote_refs():
                self._ack_ignored(ref, "not a member of the call")
                continue
            self._acks[(ref, kind)] = self._clock()
            self._log.debug("switch.ack_received", peer=ref.user_id, kind=kind.value)

    def _ack_ignored(self, ref: DeviceRef, reason: str, **context: object) -> None:
        suppressed = self._ack_rejections.admit(ref.user_id)
        if suppressed is None:
            return
        if suppressed:
            context["suppressed_before"] = suppressed
        self._log.info(
            "switch.ack_ignored",
            sender=ref.user_id,
            device=ref.device_id,
            reason=reason,
            **context,
        )

    def _tap(
        self,
        outer: FrameTap[tuple[Participant, MediaKind]],
        key: tuple[Participant, MediaKind],
        frame: TapFrame,
    ) -> None:
        p, kind = key
        if self.via(DeviceRef(p.user_id, p.device_id)) in (kind, None):
            outer(key, frame)

    # -- decisions --------------------------------------------------------------------------

    def _running(self) -> list[MediaTransport]:
        return [t for t in (self.current, self._starting) if t is not None]

    def _remote(self) -> list[Participant]:
        return [p for p in self.agent.participants if not p.is_self]

    def _decide(self) -> MediaDecision:
        # Participants, not memberships: a 2022-dialect member (Hydrogen, legacy js-sdk)
        # has no CallMembership and can only mesh.
        return choose_media(
            (p.advertised for p in self.agent.participants),
            self.config.mesh_max,
            sfu_reachable=MediaKind.SFU not in self.unreachable,
        )

    async def _drive(self) -> None:
        await self.agent.wait_joined(self.config.join_timeout_s)
        while True:
            self._dirty.clear()
            decision = self._decide()
            if decision != self.decision:
                self._log.info("switch.decision", kind=decision.kind.value, reason=decision.reason)
                self.decision = decision
            if decision.kind is not MediaKind.NONE and decision.kind is not self.kind:
                try:
                    await self._switch(decision)
                except MatrixRTCError as exc:
                    # The old transport (if any) still runs; try again on the next change or
                    # after a pause.
                    self._log.warning("switch.failed", new=decision.kind.value, error=str(exc))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.config.retry_s):
                            await self._dirty.wait()
                continue  # memberships may have moved meanwhile
            if self.current is not None:
                await self.current.update()
            await self._dirty.wait()

    def _stagger(self, new: MediaKind) -> float:
        """How long our switch to ``new`` waits for those of members before us
        (``stagger_s``). To the mesh the highest device goes first: the lower device places
        each mesh call, and an invite that comes before the callee's mesh runs is lost to the
        caller's retry (5 s later)."""
        ranked = sorted(self.agent.participants, key=lambda p: (p.user_id, p.device_id))
        if new is MediaKind.MESH:
            ranked.reverse()
        rank = next((i for i, p in enumerate(ranked) if p.is_self), 0)
        if len(ranked) < 2:
            return 0.0
        return rank * min(self.config.stagger_s, self.config.stagger_max_s / (len(ranked) - 1))

    def _context(self) -> TransportContext:
        cfg = self.config
        return TransportContext(
            agent=self.agent,
            keys=self.keys,
            media=cfg.media,
            mesh=cfg.mesh,
            sources=cfg.sources,
            encoders=self._encoders,
            frames=self._frames,
            clock=self._clock,
            wants_mesh=lambda: self._decide().kind is MediaKind.MESH,
        )

    async def _switch(self, decision: MediaDecision) -> None:
        old, new = self.current, decision.kind
        factory = self.config.transports.get(new)
        if factory is None:
            raise LocalError(f"no transport registered for {new.value}")
        started = self._clock()
        if old is not None and (delay := self._stagger(new)) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    while True:  # until the delay is over, unless the decision moves
                        await self._dirty.wait()
                        self._dirty.clear()
                        if self._decide().kind is not new:
                            return
        self._log.info(
            "switch.started",
            old=old.kind.value if old is not None else None,
            new=new.value,
            reason=decision.reason,
            members=decision.members,
        )
        transport = factory(self._context())
        self._starting = transport
        self._poll_soon.set()
        try:
            await transport.start()
        except BaseException:
            self._starting = None
            await transport.aclose()
            raise
        if old is None:
            # Nothing to hand over from: it carries our media from now on.
            self.current, self._starting = transport, None
        handover = Handover(
            old.kind if old is not None else None,
            new,
            self._remote_refs(),
            started,
            HandoverConfig(
                settle_timeout_s=self.config.settle_timeout_s,
                ack_timeout_s=self.config.ack_timeout_s if self.config.acks else 0.0,
            ),
            on_old=self._carried_by(old, self._remote()),
        )
        if old is not None and self.config.acks:
            # Members off the old path (joiners) count as told: nobody there waits for it.
            off_old = {r for r in self._remote_refs() if not handover.on_old(r)}
            self._acked[id(transport)] = (transport, started, off_old)
        self._handover, self._handing_to = handover, transport
        try:
            end = await self._run_handover(handover, transport)
            # What the old path counted but had not folded in yet: once it is detached its
            # counters are read no more (frames shown before the cutover would be lost, and
            # the gap across it overstated: a traced 94 ms gap held an old-path frame at 69).
            self.refresh()
        finally:
            self._handover = self._handing_to = None
            hidden, self._hidden = self._hidden, set()
        if isinstance(end, Abandon):
            # The decision moved back while both ran: the old transport never stopped, and
            # shows again whom it stopped decoding (from their next key frame).
            if old is not None:
                back = self._clock()
                for ref in hidden:
                    old.show(ref, True)
                    if (seen := self.peers.get(ref)) is not None:
                        seen.cut_at[old.kind] = back  # shown from the old one again
            self._starting = None
            self._teardown(transport.aclose(), transport.kind.value)
            self._log.info("switch.abandoned", old=transport.kind.value, kept=self.kind)
            return
        self.current, self._starting = transport, None
        # Detach the old transport now and close it in the background: hanging up and closing
        # peer connections can take seconds on a loaded machine, and every member takes our
        # media from the new transport already.
        if old is not None:
            self._teardown(old.aclose(), old.kind.value)
        record = SwitchRecord(
            old=old.kind if old is not None else None,
            new=new,
            reason=decision.reason,
            members=decision.members,
            started_at=started,
            finished_at=self._clock(),
            carried_at=end.at if end.complete else None,
            handover=end.reason,
        )
        self.history.append(record)
        self._records.publish(record)
        self._settled.set()
        self._log.info(
            "switch.done" if old is not None else "switch.transport_started",
            old=old.kind.value if old is not None else None,
            new=new.value,
            reason=decision.reason,
            duration_ms=round(record.duration_s * 1000),
            complete=end.complete,
            handover=end.reason,
        )

    def _carried_by(
        self, old: MediaTransport | None, peers: Sequence[Participant]
    ) -> list[DeviceRef]:
        """The members whose media ``old`` has delivered: the old path connects us."""
        if old is None or old is self._handing_to:
            return []
        video = self.config.media.video
        return [
            DeviceRef(p.user_id, p.device_id) for p in peers if old.carries(p, 0.0, video=video)
        ]

    def _remote_refs(self) -> list[DeviceRef]:
        return [DeviceRef(p.user_id, p.device_id) for p in self._remote()]

    async def _run_handover(self, h: Handover, transport: MediaTransport) -> Finish | Abandon:
        """Feed the machine until it finishes: each member's first decoded media over
        ``transport`` since the switch began (of what it publishes: ``MediaTransport.carries``),
        its acknowledgements, membership changes and the time. A decision that moves back to
        the old kind abandons the switch; one that moves elsewhere ends it at once."""
        video = self.config.media.video
        refs = self._remote_refs()
        while True:
            now = self._clock()
            actions: list[HandoverAction] = []
            if self._dirty.is_set():
                decided = self._decide().kind
                if decided is not transport.kind:
                    self._log.info("switch.overtaken", kind=transport.kind.value, now=decided)
                    if decided is h.old:
                        actions += h.abandon(now)
                    else:
                        return Finish(False, f"overtaken by {decided.value}", now)
                current = self._remote_refs()
                if current != refs:
                    joined = [
                        p for p in self._remote() if DeviceRef(p.user_id, p.device_id) not in refs
                    ]
                    refs = current
                    await transport.update()
                    actions += h.set_peers(refs, now, on_old=self._carried_by(self.current, joined))
                    entry = self._acked.get(id(transport))
                    if entry is not None:  # a joiner off the old path waits for nothing
                        entry[2].update(r for r in refs if not h.on_old(r))
            for p in self._remote():
                ref = DeviceRef(p.user_id, p.device_id)
                if not h.cut_over(ref) and transport.carries(p, h.started_at, video=video):
                    actions += h.delivered(ref, now)
                acked = self._acks.get((ref, h.new))
                if acked is not None and acked >= h.started_at:
                    actions += h.acked(ref, now)
            actions += h.tick(now)
            for a in actions:
                if isinstance(a, Cutover):
                    seen = self.peers.get(a.peer)
                    if seen is None:
                        seen = self.peers[a.peer] = PeerMedia(a.peer)
                    seen.cut_at[a.kind] = a.at
                    if self._video_since(transport, a.peer, h.started_at):
                        # From now on the new path's latest frame is what this member shows.
                        self._frame_seen(seen, a.kind, a.at)
                    if h.on_old(a.peer):  # only a member on the old path waits for it
                        self._ack(transport, a.peer)
                    old = self.current
                    if old is not None and old is not transport:
                        # Its frames there are shown no more: decoding them only took CPU
                        # from the paths still shown until the old one is torn down (the
                        # 2-core bench box ran saturated during the overlap).
                        old.show(a.peer, False)
                        self._hidden.add(a.peer)
                    self._log.info(
                        "switch.cutover",
                        peer=a.peer.user_id,
                        kind=a.kind.value,
                        ms=round((a.at - h.started_at) * 1000),
                    )
                elif isinstance(a, Finish | Abandon):
                    self._flush_acks()
                    if isinstance(a, Finish) and not a.complete:
                        self._log.warning(
                            "switch.settle_timeout",
                            kind=h.new.value,
                            waiting=len(h.waiting_for(now)),
                        )
                    return a
            self._flush_acks()
            await asyncio.sleep(self.config.poll_s)

    # -- acknowledgements -------------------------------------------------------------------

    def _send_acks(self) -> None:
        """After a switch's handover ended, tell each member the first time the transport it
        brought up delivers its media (within ``settle_timeout_s + ack_timeout_s`` of its
        start): a member still switching waits for that. During the handover this happens at
        each cutover."""
        running = {id(t) for t in self._running()}
        window = self.config.settle_timeout_s + self.config.ack_timeout_s
        now = self._clock()
        for key, (t, since, told) in list(self._acked.items()):
            if key not in running or now - since > window:
                del self._acked[key]
                continue
            if t is self._handing_to:
                continue
            for p in self._remote():
                ref = DeviceRef(p.user_id, p.device_id)
                if ref not in told and t.carries(p, since, video=self.config.media.video):
                    self._ack(t, ref)
        self._flush_acks()

    def _ack(self, t: MediaTransport, ref: DeviceRef) -> None:
        """Tell ``ref`` we receive it over ``t``, once (only for a transport a switch brought
        up: a start or a steady call has nobody waiting for it), with the next flush."""
        entry = self._acked.get(id(t))
        if entry is not None and ref not in entry[2]:
            entry[2].add(ref)
            self._ack_outbox.setdefault(t.kind, []).append(ref)

    def _flush_acks(self) -> None:
        """Send the acknowledgements due: one to-device request for all the members cut over
        in the same poll (members switch together: a request each would cost the homeserver
        a request, and every member a response, per pair)."""
        outbox, self._ack_outbox = self._ack_outbox, {}
        for kind, refs in outbox.items():
            self._tasks.spawn(self._send_acks_to(refs, kind), f"acks {kind.value} x{len(refs)}")

    async def _send_acks_to(self, to: Sequence[DeviceRef], kind: MediaKind) -> None:
        content = {"room_id": self.agent.room_id, "kind": kind.value}
        try:
            result = await self.agent.hs.send_to_device(
                SWITCH_ACK_TYPE, dict.fromkeys(to, content), encrypted=True
            )
        except Exception as exc:  # the peers fall back to their ack timeout
            self._log.warning(
                "switch.ack_send_failed", peers=[r.user_id for r in to], error=repr(exc)
            )
            return
        if result.failed:
            self._log.warning(
                "switch.ack_send_failed", peers=[r.user_id for r in result.failed], error="olm"
            )

    # -- transports -------------------------------------------------------------------------

    def _teardown(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        async def run() -> None:
            started = self._clock()
            try:
                async with asyncio.timeout(self.config.close_timeout_s):
                    await coro
            except TimeoutError:
                self._log.warning("switch.teardown_timeout", transport=what)
            else:
                self._log.info(
                    "switch.teardown_done",
                    transport=what,
                    ms=round((self._clock() - started) * 1000),
                )

        self._teardowns.spawn(run(), what)

    # -- media monitor ----------------------------------------------------------------------

    def _watch_failure(self) -> None:
        """Mark the current transport's kind unreachable once it has failed for a while."""
        t = self.current
        if t is None or t.kind in self.unreachable or not t.failing():
            self._failing_since = None
            return
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.config.fail_after_s:
            self._failing_since = None
            self.unreachable.add(t.kind)
            self._log.warning("switch.transport_unreachable", kind=t.kind.value)
            self._dirty.set()

    async def _probe_loop(self) -> None:
        """Probe each unreachable kind until it answers again."""
        while True:
            await asyncio.sleep(self.config.probe_s)
            for kind in list(self.unreachable):
                probe = self.config.probes.get(kind)
                try:
                    back = probe is None or await probe(self._context())
                except Exception as exc:  # a probe that breaks says "not yet"
                    self._log.warning("switch.probe_failed", kind=kind.value, error=repr(exc))
                    back = False
                if back:
                    self.unreachable.discard(kind)
                    self._log.info("switch.transport_reachable", kind=kind.value)
                    self._dirty.set()

    async def _monitor(self) -> None:
        failures = 0
        while True:
            try:
                self._watch_failure()
                self._poll()
                if self.config.acks:
                    self._send_acks()
            except Exception as exc:  # e.g. a transport closing under our feet: poll again
                failures += 1
                if failures == 1 or failures % 1000 == 0:
                    self._log.warning("switch.poll_failed", error=repr(exc), count=failures)
            if self._switching():
                await asyncio.sleep(self.config.poll_s)
                continue
            self._poll_soon.clear()
            with contextlib.suppress(TimeoutError):  # a switch starting wakes us early
                async with asyncio.timeout(self.config.idle_poll_s):
                    await self._poll_soon.wait()

    def _switching(self) -> bool:
        """A transport is starting or handing over, or acknowledgements may still be due."""
        return self._starting is not None or self._handover is not None or bool(self._acked)

    def _poll(self) -> None:
        live: dict[int, _Source] = {}
        for p in self._remote():
            ref = DeviceRef(p.user_id, p.device_id)
            peer = self.peers.get(ref)
            if peer is None:
                peer = self.peers[ref] = PeerMedia(ref)
            peer.via = via = self.via(ref)
            shown: list[tuple[float, MediaKind]] = []
            for kind, c in self._frame_sources(p):
                obj, count, last = c.source, c.frames, c.last_frame_at
                seen = self._sources.get(id(obj))
                new = count - (seen.count if seen is not None and seen.obj is obj else 0)
                live[id(obj)] = _Source(obj, count)
                if new <= 0 or last is None:
                    continue
                peer.frames[kind] = peer.frames.get(kind, 0) + new
                # Every frame since the last poll, where the counter keeps their times: a poll
                # that sees several frames would otherwise count one gap up to the newest.
                times = sorted(c.times(new)) if c.times is not None else []
                for at in times if times and times[-1] == last else [last]:
                    # Only what this member was shown at the frame's time makes or closes a
                    # gap: counters report frames a little after they were decoded (the
                    # LiveKit engines fold theirs every 50 ms), so a frame of the old path
                    # decoded just before the cutover may be seen only after it.
                    if _shown_via(peer, at, via) is kind:
                        shown.append((at, kind))
            for at, kind in sorted(shown, key=lambda s: s[0]):
                self._frame_seen(peer, kind, at)
        self._sources = live

    def _frame_seen(self, peer: PeerMedia, kind: MediaKind, at: float) -> None:
        last = peer.last_frame_at
        if last is None or at > last:
            if last is not None:
                self._add_gap(peer, GapRecord(peer.peer, last, at, kind))
            else:
                peer.first_frame_at = at
            peer.last_frame_at = at
            peer.shown.append(at)
            if len(peer.shown) > 2 * _SHOWN_KEPT:
                del peer.shown[:-_SHOWN_KEPT]
            return
        # Reported after a later frame (another counter's, seen in an earlier poll): it splits
        # the gap it fell into, if that gap is still among the recent ones.
        i = bisect.bisect_left(peer.shown, at)
        if i == 0 or i >= len(peer.shown) or peer.shown[i] == at:
            return
        before, after = peer.shown[i - 1], peer.shown[i]
        split = next(
            (g for g in reversed(self.gaps) if g.peer == peer.peer and g.start == before),
            None,
        )
        if split is None or split.end != after:
            return
        self.gaps.remove(split)
        self._add_gap(peer, GapRecord(peer.peer, before, at, kind))
        self._add_gap(peer, GapRecord(peer.peer, at, after, split.transport))
        peer.shown.insert(i, at)
        if split.seconds >= peer.max_gap_s:
            peer.max_gap_s = max((g.seconds for g in self.gaps if g.peer == peer.peer), default=0.0)

    def _add_gap(self, peer: PeerMedia, gap: GapRecord) -> None:
        peer.max_gap_s = max(peer.max_gap_s, gap.seconds)
        self.gaps.append(gap)

    def _video_since(self, t: MediaTransport, ref: DeviceRef, since: float) -> bool:
        p = next((p for p in self._remote() if DeviceRef(p.user_id, p.device_id) == ref), None)
        return p is not None and any(
            c.last_frame_at is not None and c.last_frame_at >= since for c in t.video_counters(p)
        )

    def _frame_sources(self, p: Participant) -> list[tuple[MediaKind, FrameCounter]]:
        return [(t.kind, c) for t in self._running() for c in t.video_counters(p)]
