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

Switching is make-before-break: when the decision changes, the new transport is brought up
while the old one keeps carrying media; once the new one has delivered a video frame from
every remote member (or ``settle_timeout_s`` has passed) the old one is torn down. Every
member computes the same decision from the same membership list, so all switch together and
nobody leads. Keys come from :class:`~matrixrtc.call_keys.CallKeys` on both transports (each
transport takes them from the context it is built with), so media keeps flowing under the
current keys across a switch.

Reports: :attr:`MediaSwitcher.history` (one :class:`SwitchRecord` per start or switch, with
reason and duration), :attr:`MediaSwitcher.peers` (per remote device: frames seen over each
transport and the largest gap between two consecutive video frames over either) and
:attr:`MediaSwitcher.gaps` (the latest inter-frame gaps, for figures around a switch). Frames are
observed by polling the transports' counters every ``poll_s``; a gap is measured from the
previous frame's arrival time to the newest frame's arrival time at the poll that sees frames
again, so it can only be overstated (by at most the frames that arrived within one poll).

SFU failure: when the transport carrying our media reports it has lost its server
(:meth:`MediaTransport.failing`) for ``fail_after_s``, that kind counts as unreachable and
the policy is asked again with ``sfu_reachable=False`` (a call whose members can all mesh moves
to the mesh, make-before-break as ever). Every ``probe_s`` the kind's probe
(``SwitchConfig.probes``) asks whether it could work again; once it says so the policy decides
as before, and the call moves back. The web client (web/src/call.ts) does the same with the
same delays, so a browser and a Python member fall back and return together.

Every task is owned and cancelled on exit; leaving the block tears down the running transport.
"""

from __future__ import annotations

import asyncio
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
from matrixrtc.matrix import Broadcaster, Subscription
from matrixrtc.media.frames import FrameTap
from matrixrtc.media_transport import (
    DEFAULT_PROBES,
    DEFAULT_TRANSPORTS,
    MediaTransport,
    TransportContext,
    TransportFactory,
    TransportProbe,
)
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.mesh.matrix_link import MeshLinkConfig
from matrixrtc.session.media_policy import (
    DEFAULT_MESH_MAX,
    MediaDecision,
    MediaKind,
    choose_media,
)
from matrixrtc.session.mesh_signalling import DeviceRef, SignallingConfig
from matrixrtc.tasks import OwnedTasks

__all__ = [
    "SWITCH_MESH",
    "GapRecord",
    "MediaSwitcher",
    "PeerMedia",
    "SwitchConfig",
    "SwitchRecord",
]

log = structlog.get_logger(__name__)

_MAX_GAP_RECORDS: Final = 8192  # every inter-frame gap is kept; at 15 fps × 3 peers, ~3 min


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
    # Local tracks for each transport we start (a mesh, a publishing LiveKit connection); the
    # transport stops them when it closes. None: synthetic video (and a tone) from ``media``.
    sources: Callable[[], Sequence[MediaStreamTrack]] | None = None
    settle_timeout_s: float = 10.0  # longest make-before-break overlap
    join_timeout_s: float = 30.0  # until the room shows our own membership
    poll_s: float = 0.02
    retry_s: float = 2.0  # pause after a transport failed to start
    close_timeout_s: float = 15.0  # longest wait for an old transport to close
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

    def open_gap_s(self, now: float) -> float:
        return 0.0 if self.last_frame_at is None else max(0.0, now - self.last_frame_at)


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
        carried it."""
        self.agent = agent
        self.keys = keys
        self.config = config or SwitchConfig()
        self._frames = frames
        self._records: Broadcaster[SwitchRecord] = Broadcaster()
        self._clock = clock
        self.current: MediaTransport | None = None  # carries our media now
        self._starting: MediaTransport | None = None  # being brought up by a switch
        self.decision: MediaDecision | None = None
        self.history: list[SwitchRecord] = []
        self.peers: dict[DeviceRef, PeerMedia] = {}
        self.gaps: collections.deque[GapRecord] = collections.deque(maxlen=_MAX_GAP_RECORDS)
        self._sources: dict[int, _Source] = {}
        self._dirty = asyncio.Event()
        self._settled = asyncio.Event()
        self._tasks = OwnedTasks("switch", log, event_prefix="switch")
        # Old transports being closed: awaited (never cancelled) when the switcher closes.
        self._teardowns = OwnedTasks("switch-teardown", log, event_prefix="switch.teardown")
        self._changes: Subscription[ParticipantsChanged] | None = None
        self.unreachable: set[MediaKind] = set()  # kinds whose transport failed, not yet back
        self._failing_since: float | None = None
        self._log = log.bind(room_id=agent.room_id, user_id=agent.hs.user_id)

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._changes = self.agent.changes()
        self._spawn(self._changes_loop(self._changes), "changes")
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
        if self._changes is not None:
            self._changes.close()
        teardown_failure = await self._teardowns.join()  # each bounded by close_timeout_s
        failure = failure or teardown_failure
        for t in self._running():
            try:
                await t.aclose()
            except MatrixRTCError as exc:  # close every transport; raise the first failure
                self._log.error("switch.close_failed", transport=t.kind.value, error=repr(exc))
                failure = failure or exc
        self.current = self._starting = None
        self._records.end()
        if failure is not None:
            raise failure

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)

    # -- public view ------------------------------------------------------------------------

    @property
    def kind(self) -> MediaKind | None:
        """The kind of transport carrying our media now (None before the first one)."""
        return self.current.kind if self.current is not None else None

    def running(self, kind: MediaKind) -> MediaTransport | None:
        """The running transport of ``kind`` (carrying media, or being switched to)."""
        return next((t for t in self._running() if t.kind is kind), None)

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

    def max_gap_s(self, since: float | None = None, until: float | None = None) -> float:
        """Largest video gap from any peer; with bounds, among gaps overlapping them."""
        lo = float("-inf") if since is None else since
        hi = float("inf") if until is None else until
        best = 0.0
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

    def _context(self) -> TransportContext:
        cfg = self.config
        return TransportContext(
            agent=self.agent,
            keys=self.keys,
            media=cfg.media,
            mesh=cfg.mesh,
            sources=cfg.sources,
            frames=self._frames,
            clock=self._clock,
        )

    async def _switch(self, decision: MediaDecision) -> None:
        old, new = self.current, decision.kind
        factory = self.config.transports.get(new)
        if factory is None:
            raise LocalError(f"no transport registered for {new.value}")
        started = self._clock()
        self._log.info(
            "switch.started",
            old=old.kind.value if old is not None else None,
            new=new.value,
            reason=decision.reason,
            members=decision.members,
        )
        transport = factory(self._context())
        self._starting = transport
        try:
            await transport.start()
        except BaseException:
            self._starting = None
            await transport.aclose()
            raise
        if old is None:
            # Nothing to hand over from: it carries our media from now on.
            self.current, self._starting = transport, None
        carried_at = await self._wait_carried(transport, started)
        self.current, self._starting = transport, None
        # Detach the old transport now and close it in the background: hanging up and closing
        # peer connections can take seconds on a loaded machine, and the call is already on
        # the new transport (its frames no longer count).
        if old is not None:
            self._teardown(old.aclose(), old.kind.value)
        record = SwitchRecord(
            old=old.kind if old is not None else None,
            new=new,
            reason=decision.reason,
            members=decision.members,
            started_at=started,
            finished_at=self._clock(),
            carried_at=carried_at,
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
            carried_ms=None if carried_at is None else round((carried_at - started) * 1000),
            complete=carried_at is not None,
        )

    async def _wait_carried(self, transport: MediaTransport, since: float) -> float | None:
        """Until ``transport`` has carried media from every remote member since ``since`` (of
        what each publishes: ``MediaTransport.carries``); None after ``settle_timeout_s``, or
        when the decision moved away."""
        deadline = since + self.config.settle_timeout_s
        video = self.config.media.video
        while self._clock() < deadline:
            if self._dirty.is_set():
                decided = self._decide().kind
                if decided is not transport.kind:
                    self._log.info("switch.overtaken", kind=transport.kind.value)
                    return None
                await transport.update()
            if all(transport.carries(p, since, video=video) for p in self._remote()):
                return self._clock()
            await asyncio.sleep(self.config.poll_s * 2)
        self._log.warning("switch.settle_timeout", kind=transport.kind.value)
        return None

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
            except Exception as exc:  # e.g. a transport closing under our feet: poll again
                failures += 1
                if failures == 1 or failures % 1000 == 0:
                    self._log.warning("switch.poll_failed", error=repr(exc), count=failures)
            await asyncio.sleep(self.config.poll_s)

    def _poll(self) -> None:
        live: dict[int, _Source] = {}
        for p in self._remote():
            ref = DeviceRef(p.user_id, p.device_id)
            peer = self.peers.get(ref)
            if peer is None:
                peer = self.peers[ref] = PeerMedia(ref)
            for kind, obj, count, last in self._frame_sources(p):
                seen = self._sources.get(id(obj))
                new = count - (seen.count if seen is not None and seen.obj is obj else 0)
                live[id(obj)] = _Source(obj, count)
                if new <= 0 or last is None:
                    continue
                peer.frames[kind] = peer.frames.get(kind, 0) + new
                if peer.first_frame_at is None:
                    peer.first_frame_at = last
                elif peer.last_frame_at is not None and last > peer.last_frame_at:
                    gap = last - peer.last_frame_at
                    if gap > peer.max_gap_s:
                        peer.max_gap_s = gap
                    self.gaps.append(GapRecord(ref, peer.last_frame_at, last, kind))
                if peer.last_frame_at is None or last > peer.last_frame_at:
                    peer.last_frame_at = last
        self._sources = live

    def _frame_sources(self, p: Participant) -> list[tuple[MediaKind, object, int, float | None]]:
        return [
            (t.kind, c.source, c.frames, c.last_frame_at)
            for t in self._running()
            for c in t.video_counters(p)
        ]
