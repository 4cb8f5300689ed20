"""Make-before-break for one mesh ↔ SFU switch, pure (no I/O; the caller passes the time).

Public API::

    h = Handover(old, new, peers, now, HandoverConfig(), on_old=peers_the_old_path_carries)
    h.delivered(peer, now)   # the new path delivered a decodable frame from peer
    h.acked(peer, now)       # peer says it receives *our* media over the new path
    h.set_peers(peers, now, on_old=...)  # the call's remote devices changed
    h.tick(now)              # timeouts
    h.via(peer)              # which path to take peer's media from now
    h.abandon(now)           # the decision moved back: drop the new path, keep the old

Each input returns the actions it causes, in order:

* :class:`Cutover` — from now on take ``peer``'s media from the new path. Emitted once per
  peer, the first time the new path has delivered a decoded (so decrypted) frame from it. Until
  then the peer's media is taken from the old path, which keeps flowing.
* :class:`Finish` — the old path may be torn down: every remote peer is *done*, i.e. we have
  cut it over **and**, if the old path carries it (``on_old``), it has told us it receives our
  media over the new path (or ``ack_timeout_s`` passed since we cut it over: a peer that sends
  no acknowledgements, such as a client of another project, costs that much double sending and
  no more). A peer the old path does not carry loses nothing when it goes: no
  acknowledgement is waited for. ``complete`` is
  False when ``settle_timeout_s`` ran out first (the old path goes anyway: the overlap, with
  its double encoding, is bounded).
* :class:`Abandon` — tear down the new path instead; the old one carries on.

Why both conditions. Every member switches on its own (each computes the same decision from the
membership list, seen at slightly different times); nobody leads. Tearing down our old path
stops our media to the others on it, so it must wait until each of them takes our media from
the new path: their acknowledgement says so. Their own old path is theirs to tear down by the
same rule. A peer that joined during the switch is on the new path only; it still counts (we
must receive it), but nothing of ours reaches it over the old path, so its acknowledgement is
not waited for.

A start (``old`` None) uses the same machine: it cuts peers over as they arrive and finishes
when all have; there is nothing to tear down (no peer is on the old path).

After :class:`Finish` or :class:`Abandon` the machine takes no more input (``phase``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from matrixrtc.model.devices import DeviceRef
from matrixrtc.session.media_policy import MediaKind

__all__ = [
    "Abandon",
    "Cutover",
    "Finish",
    "Handover",
    "HandoverAction",
    "HandoverConfig",
    "Phase",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class HandoverConfig:
    settle_timeout_s: float = 10.0  # longest overlap of the two paths
    ack_timeout_s: float = 3.0  # after a peer's cutover, longest wait for its acknowledgement


class Phase(StrEnum):
    OVERLAP = "overlap"  # both paths run (or, for a start, peers are still arriving)
    FINISHED = "finished"  # the old path may go
    ABANDONED = "abandoned"  # the new path goes


@dataclass(frozen=True, slots=True)
class Cutover:
    peer: DeviceRef
    kind: MediaKind  # the new path
    at: float


@dataclass(frozen=True, slots=True)
class Finish:
    complete: bool  # every peer done; False: settle_timeout_s ran out
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Abandon:
    at: float


HandoverAction = Cutover | Finish | Abandon


@dataclass(slots=True)
class _Peer:
    cut_at: float | None = None
    acked_at: float | None = None


class Handover:
    """See the module docstring. ``started_at``: when the new path began to be built."""

    def __init__(
        self,
        old: MediaKind | None,
        new: MediaKind,
        peers: Iterable[DeviceRef],
        started_at: float,
        config: HandoverConfig | None = None,
        *,
        on_old: Iterable[DeviceRef] | None = None,
    ) -> None:
        """``on_old``: the peers the old path carries (None: all of ``peers`` when there is an
        old path)."""
        self.old = old
        self.new = new
        self.started_at = started_at
        self.config = config or HandoverConfig()
        self.phase = Phase.OVERLAP
        self._peers: dict[DeviceRef, _Peer] = {p: _Peer() for p in peers}
        self._on_old: set[DeviceRef] = (
            set() if old is None else set(self._peers if on_old is None else on_old)
        )

    # -- queries ----------------------------------------------------------------------------

    def via(self, peer: DeviceRef) -> MediaKind | None:
        """The path to take ``peer``'s media from: the new one once cut over (or once the
        machine finished), else the old one (None: nothing carries it yet, for a start; the
        old one again after :meth:`abandon`)."""
        p = self._peers.get(peer)
        if self.phase is Phase.ABANDONED:
            return self.old
        if self.phase is Phase.FINISHED or (p is not None and p.cut_at is not None):
            return self.new
        return self.old

    def cut_over(self, peer: DeviceRef) -> bool:
        p = self._peers.get(peer)
        return p is not None and p.cut_at is not None

    def on_old(self, peer: DeviceRef) -> bool:
        """Whether the old path carries ``peer`` (so it waits for our acknowledgement)."""
        return peer in self._on_old

    def waiting_for(self, now: float) -> dict[DeviceRef, str]:
        """Peers not done yet and what each is waiting for ("media" or "ack")."""
        return {
            ref: "media" if p.cut_at is None else "ack"
            for ref, p in self._peers.items()
            if not self._done(ref, p, now)
        }

    # -- inputs -----------------------------------------------------------------------------

    def delivered(self, peer: DeviceRef, now: float) -> list[HandoverAction]:
        p = self._peers.get(peer)
        if self.phase is not Phase.OVERLAP or p is None:
            return []
        out: list[HandoverAction] = []
        if p.cut_at is None:
            p.cut_at = now
            out.append(Cutover(peer, self.new, now))
        return out + self._evaluate(now)

    def acked(self, peer: DeviceRef, now: float) -> list[HandoverAction]:
        p = self._peers.get(peer)
        if self.phase is not Phase.OVERLAP or p is None:
            return []
        if p.acked_at is None:
            p.acked_at = now
        return self._evaluate(now)

    def set_peers(
        self,
        peers: Iterable[DeviceRef],
        now: float,
        *,
        on_old: Iterable[DeviceRef] = (),
    ) -> list[HandoverAction]:
        """A peer that left is no longer waited for; one that joined is (for its media, and
        for its acknowledgement only if the old path carries it too: ``on_old``)."""
        if self.phase is not Phase.OVERLAP:
            return []
        wanted = set(peers)
        if self.old is not None:
            self._on_old |= set(on_old)
        self._peers = {ref: self._peers.get(ref) or _Peer() for ref in wanted}
        return self._evaluate(now)

    def tick(self, now: float) -> list[HandoverAction]:
        if self.phase is not Phase.OVERLAP:
            return []
        return self._evaluate(now)

    def abandon(self, now: float) -> list[HandoverAction]:
        if self.phase is not Phase.OVERLAP:
            return []
        self.phase = Phase.ABANDONED
        return [Abandon(now)]

    # -- rules ------------------------------------------------------------------------------

    def _done(self, ref: DeviceRef, p: _Peer, now: float) -> bool:
        if p.cut_at is None:
            return False
        if ref not in self._on_old or p.acked_at is not None:
            return True  # the old path does not carry it: no acknowledgement to wait for
        return now - p.cut_at >= self.config.ack_timeout_s

    def _evaluate(self, now: float) -> list[HandoverAction]:
        waiting = [p for ref, p in self._peers.items() if not self._done(ref, p, now)]
        if not waiting:
            self.phase = Phase.FINISHED
            acks = sum(1 for p in self._peers.values() if p.acked_at is not None)
            return [Finish(True, f"{len(self._peers)} peers cut over, {acks} acknowledged", now)]
        if now - self.started_at >= self.config.settle_timeout_s:
            self.phase = Phase.FINISHED
            media = sum(1 for p in waiting if p.cut_at is None)
            reason = f"settle timeout: {media} peers without media, {len(waiting) - media} unacked"
            return [Finish(False, reason, now)]
        return []
