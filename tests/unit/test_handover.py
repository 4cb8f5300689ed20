"""The make-before-break machine of one switch (matrixrtc.session.handover): per-peer cutover
on the new path's first decoded frame, teardown of the old path only once every peer is cut
over and has acknowledged receiving us, bounded by its timeouts. Time is passed in."""

from __future__ import annotations

from matrixrtc.model.devices import DeviceRef
from matrixrtc.session.handover import (
    Abandon,
    Cutover,
    Finish,
    Handover,
    HandoverConfig,
    Phase,
)
from matrixrtc.session.media_policy import MediaKind

A = DeviceRef("@a:x", "A")
B = DeviceRef("@b:x", "B")
C = DeviceRef("@c:x", "C")
CFG = HandoverConfig(settle_timeout_s=10.0, ack_timeout_s=3.0)
MESH, SFU = MediaKind.MESH, MediaKind.SFU


def switch(*peers: DeviceRef, old: MediaKind | None = MESH) -> Handover:
    return Handover(old, SFU, peers, 100.0, CFG)


def test_a_peer_is_taken_from_the_old_path_until_the_new_one_delivers_it() -> None:
    h = switch(A, B)
    assert h.via(A) is MESH
    assert h.via(B) is MESH
    assert h.delivered(A, 100.4) == [Cutover(A, SFU, 100.4)]
    assert h.via(A) is SFU
    assert h.via(B) is MESH
    assert h.delivered(A, 100.5) == []  # one cutover per peer


def test_the_old_path_goes_only_when_every_peer_is_cut_over_and_acknowledged() -> None:
    h = switch(A, B)
    assert h.acked(A, 100.2) == []  # A got our media before we got its: noted
    assert h.delivered(A, 100.3) == [Cutover(A, SFU, 100.3)]  # B still missing
    assert h.delivered(B, 100.4) == [Cutover(B, SFU, 100.4)]  # B has not acknowledged
    assert h.tick(102.0) == []
    assert h.waiting_for(102.0) == {B: "ack"}
    [finish] = h.acked(B, 102.1)
    assert isinstance(finish, Finish)
    assert finish.complete
    assert finish.at == 102.1
    assert h.phase is Phase.FINISHED
    assert h.tick(103.0) == []
    assert h.delivered(C, 103.0) == []


def test_a_peer_that_never_acknowledges_holds_the_old_path_for_ack_timeout_only() -> None:
    h = switch(A)
    h.delivered(A, 101.0)
    assert h.tick(103.9) == []
    [finish] = h.tick(104.0)
    assert isinstance(finish, Finish)
    assert finish.complete


def test_settle_timeout_bounds_the_overlap_when_a_peer_never_arrives() -> None:
    h = switch(A, B)
    h.delivered(A, 100.1)
    h.acked(A, 100.2)
    assert h.tick(109.9) == []
    [finish] = h.tick(110.0)
    assert isinstance(finish, Finish)
    assert not finish.complete
    assert "1 peers without media" in finish.reason
    assert h.via(B) is SFU  # the old path is gone: whatever comes, comes over the new one


def test_peers_leaving_and_joining_during_the_overlap() -> None:
    h = switch(A, B)
    h.delivered(A, 100.1)
    h.acked(A, 100.1)
    assert h.set_peers([A, C], 100.2) == []  # B left: not waited for; C joined: waited for
    assert h.waiting_for(100.2) == {C: "media"}
    [_, finish] = h.delivered(C, 100.3)  # C is not on the old path: no ack to wait for
    assert isinstance(finish, Finish)
    assert finish.complete
    # Everyone left: nothing to wait for.
    h2 = switch(A)
    [done] = h2.set_peers([], 100.5)
    assert isinstance(done, Finish)
    assert done.complete


def test_a_start_needs_no_acknowledgement_and_finishes_when_everyone_arrived() -> None:
    h = switch(A, B, old=None)
    assert h.via(A) is None
    h.delivered(A, 100.1)
    [cut, finish] = h.delivered(B, 100.2)
    assert cut == Cutover(B, SFU, 100.2)
    assert isinstance(finish, Finish)
    assert finish.complete


def test_abandon_keeps_the_old_path() -> None:
    h = switch(A)
    h.delivered(A, 100.1)
    assert h.abandon(100.5) == [Abandon(100.5)]
    assert h.phase is Phase.ABANDONED
    assert h.via(A) is MESH  # back on the old path
    assert h.acked(A, 100.6) == []
    assert h.tick(200.0) == []


def test_only_peers_on_the_old_path_must_acknowledge() -> None:
    h = Handover(MESH, SFU, [A, B], 100.0, CFG, on_old=[A])  # B joined as we switched
    assert h.on_old(A)
    assert not h.on_old(B)
    h.delivered(B, 100.1)
    assert h.waiting_for(100.1) == {A: "media"}
    h.delivered(A, 100.2)
    assert h.waiting_for(100.2) == {A: "ack"}
    h.set_peers([A, B, C], 100.3, on_old=[C])  # C appeared on the old path too
    h.delivered(C, 100.4)
    assert h.waiting_for(100.4) == {A: "ack", C: "ack"}
    h.acked(A, 100.5)
    [finish] = h.acked(C, 100.6)
    assert isinstance(finish, Finish)
    assert finish.reason == "3 peers cut over, 2 acknowledged"
