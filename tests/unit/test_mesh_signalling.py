"""The pure mesh signalling core, driven with simulated time and an in-memory to-device link."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixrtc.model.livekit_ids import livekit_room_alias
from matrixrtc.model.transports import FULL_MESH_TYPE
from matrixrtc.model.voip import HangupReason, StreamMetadata, StreamPurpose
from matrixrtc.session.mesh_signalling import (
    AddIceCandidates,
    CallDirection,
    CallState,
    ClosePeerConnection,
    CreateOffer,
    DeviceRef,
    LocalDevice,
    MeshSignalling,
    RemoteStreamMetadata,
    SendToDevice,
    SetRemoteDescription,
    SignallingAction,
    SignallingConfig,
    mesh_conf_id,
    wants_outgoing_call,
    with_mesh_transport,
)

CONF = mesh_conf_id("!room:hs")
ALICE = DeviceRef("@alice:hs", "AAA")
BOB = DeviceRef("@bob:hs", "BBB")
CAROL = DeviceRef("@carol:hs", "CCC")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Mesh:
    """Nodes joined by an in-memory to-device link; the 'engine' answers SDP work at once."""

    def __init__(self, clock: Clock, *refs: DeviceRef, config: SignallingConfig | None = None):
        self.clock = clock
        counter = itertools.count()
        self.nodes: dict[DeviceRef, MeshSignalling] = {}
        for ref in refs:
            self.nodes[ref] = MeshSignalling(
                LocalDevice(
                    user_id=ref.user_id,
                    device_id=ref.device_id,
                    session_id=f"s-{ref.device_id}",
                    conf_id=CONF,
                ),
                clock=clock,
                config=config,
                # Ids sort in creation order so glare outcomes are predictable.
                new_call_id=self._ids(counter, ref),
            )
        self.log: list[tuple[DeviceRef, SignallingAction]] = []
        self.blocked: set[DeviceRef] = set()  # to-device messages to these are lost
        self.auto_sdp = True

    @staticmethod
    def _ids(counter: itertools.count[int], ref: DeviceRef) -> Callable[[], str]:
        return lambda: f"c{next(counter):04d}{ref.device_id}"

    def sessions(self, *refs: DeviceRef) -> dict[DeviceRef, str]:
        return {r: f"s-{r.device_id}" for r in refs}

    def pump(self, origin: DeviceRef, actions: Iterable[SignallingAction]) -> None:
        queue = deque((origin, a) for a in actions)
        while queue:
            who, action = queue.popleft()
            self.log.append((who, action))
            node = self.nodes[who]
            more: list[SignallingAction] = []
            if isinstance(action, SendToDevice):
                target = DeviceRef(action.user_id, action.device_id)
                if target in self.nodes and target not in self.blocked:
                    out = self.nodes[target].receive(
                        who.user_id, action.event_type, dict(action.content)
                    )
                    queue.extend((target, a) for a in out)
                continue
            if not self.auto_sdp:
                continue
            if isinstance(action, CreateOffer):
                more = node.offer_created(action.call_id, f"offer-{action.call_id}")
            elif isinstance(action, SetRemoteDescription) and action.description.type == "offer":
                more = node.answer_created(action.call_id, f"answer-{action.call_id}")
            queue.extend((who, a) for a in more)

    def join(self, members: Mapping[DeviceRef, str]) -> None:
        for ref, node in self.nodes.items():
            self.pump(ref, node.set_members(members))

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + step)
            for ref, node in self.nodes.items():
                self.pump(ref, node.tick())

    def sent(
        self, who: DeviceRef | None = None, event_type: str | None = None
    ) -> list[SendToDevice]:
        return [
            a
            for w, a in self.log
            if isinstance(a, SendToDevice)
            and (who is None or w == who)
            and (event_type is None or a.event_type == event_type)
        ]

    def of(self, kind: type[Any], who: DeviceRef | None = None) -> list[Any]:
        return [a for w, a in self.log if isinstance(a, kind) and (who is None or w == who)]


def envelope(call_id: str = "c0000AAA", seq: int | None = 0, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "call_id": call_id,
        "party_id": "AAA",
        "version": "1",
        "conf_id": CONF,
        "device_id": "AAA",
        "sender_session_id": "s-AAA",
        "dest_session_id": "s-BBB",
        "seq": seq,
    }
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def bob_alone(clock: Clock, config: SignallingConfig | None = None) -> MeshSignalling:
    bob = MeshSignalling(
        LocalDevice(user_id=BOB.user_id, device_id=BOB.device_id, session_id="s-BBB", conf_id=CONF),
        clock=clock,
        config=config,
    )
    bob.set_members({ALICE: "s-AAA", BOB: "s-BBB"})
    return bob


INVITE_BODY = {"offer": {"type": "offer", "sdp": "v=0"}, "lifetime": 60000}

# -- who calls whom, identifiers -----------------------------------------------------------


def test_lower_user_calls_then_lower_device() -> None:
    assert wants_outgoing_call(ALICE, BOB)
    assert not wants_outgoing_call(BOB, ALICE)
    a1, a2 = DeviceRef("@alice:hs", "D1"), DeviceRef("@alice:hs", "D2")
    assert wants_outgoing_call(a1, a2)
    assert not wants_outgoing_call(a2, a1)


def test_only_the_lower_party_places_the_call() -> None:
    mesh = Mesh(Clock(), ALICE, BOB, CAROL)
    mesh.join(mesh.sessions(ALICE, BOB, CAROL))
    offers = [(w, a.peer) for w, a in mesh.log if isinstance(a, CreateOffer)]
    assert sorted(offers) == sorted([(ALICE, BOB), (ALICE, CAROL), (BOB, CAROL)])


def test_conf_id_is_room_and_slot_and_mesh_transport_goes_last() -> None:
    assert mesh_conf_id("!r:hs") == livekit_room_alias("!r:hs", "m.call#ROOM")
    assert mesh_conf_id("!r:hs") != mesh_conf_id("!r:hs", "m.call#other")
    assert mesh_conf_id("!r:hs") != mesh_conf_id("!s:hs")
    livekit = {"type": "livekit", "livekit_service_url": "http://127.0.0.1:1"}
    transports = with_mesh_transport([{"type": FULL_MESH_TYPE}, livekit])
    assert transports == [livekit, {"type": FULL_MESH_TYPE}]


# -- the handshake and the envelope --------------------------------------------------------


def test_full_handshake_and_envelope_fields() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    types = [(w.device_id, a.event_type) for w, a in mesh.log if isinstance(a, SendToDevice)]
    assert types == [
        ("AAA", "m.call.invite"),
        ("AAA", "m.call.candidates"),
        ("BBB", "m.call.answer"),
        ("BBB", "m.call.candidates"),
        ("AAA", "m.call.select_answer"),
    ]
    invite = mesh.sent(ALICE, "m.call.invite")[0].content
    assert invite["party_id"] == "AAA"
    assert invite["device_id"] == "AAA"
    assert invite["version"] == "1"
    assert invite["conf_id"] == CONF
    assert invite["sender_session_id"] == "s-AAA"
    assert invite["dest_session_id"] == "s-BBB"
    assert invite["lifetime"] == 60000
    assert invite["invitee"] == BOB.user_id
    assert invite["offer"]["sdp"].startswith("offer-")
    # seq counts per call_id from 0 on each side; select_answer goes unnumbered (Hydrogen
    # drops it before its reorder queue, so a number would leave a hole there).
    assert [m.content.get("seq") for m in mesh.sent(ALICE)] == [0, 1, None]
    assert [m.content["seq"] for m in mesh.sent(BOB)] == [0, 1]
    assert mesh.sent(ALICE, "m.call.select_answer")[0].content["selected_party_id"] == "BBB"
    assert mesh.sent(ALICE, "m.call.candidates")[0].content["candidates"] == [{"candidate": ""}]
    remote = [(w, a) for w, a in mesh.log if isinstance(a, SetRemoteDescription)]
    assert [(w, a.description.type) for w, a in remote] == [
        (BOB, "offer"),
        (ALICE, "answer"),
    ]
    a_call = mesh.nodes[ALICE].call_for(BOB)
    b_call = mesh.nodes[BOB].call_for(ALICE)
    assert a_call is not None
    assert b_call is not None
    assert a_call.call_id == b_call.call_id
    assert a_call.direction is CallDirection.OUTGOING
    assert b_call.direction is CallDirection.INCOMING
    assert a_call.state is b_call.state is CallState.CONNECTING
    mesh.nodes[ALICE].media_connected(a_call.call_id)
    assert mesh.nodes[ALICE].call_for(BOB) == a_call
    assert a_call.state.value == "connected"


def test_candidates_are_handed_to_the_engine() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    adds = [(w, a) for w, a in mesh.log if isinstance(a, AddIceCandidates)]
    assert {w for w, _ in adds} == {ALICE, BOB}
    assert all(c.end_of_candidates for _, a in adds for c in a.candidates)


# -- glare ---------------------------------------------------------------------------------


def test_glare_lower_call_id_wins_and_loser_is_replaced() -> None:
    clock = Clock()
    bob = bob_alone(clock)
    # Bob (by some rule disagreement) is also inviting Alice with a *higher* call id.
    bob_call = bob._new_call("zzz", ALICE, "s-AAA", CallDirection.OUTGOING, CallState.INVITE_SENT)
    bob._register(bob_call)
    actions = bob.receive(ALICE.user_id, "m.call.invite", envelope("aaa") | INVITE_BODY)
    hangups = [a for a in actions if isinstance(a, SendToDevice)]
    assert [(h.event_type, h.content["call_id"], h.content["reason"]) for h in hangups] == [
        ("m.call.hangup", "zzz", "replaced")
    ]
    assert any(isinstance(a, ClosePeerConnection) and a.call_id == "zzz" for a in actions)
    assert any(isinstance(a, SetRemoteDescription) and a.call_id == "aaa" for a in actions)
    assert bob.call_for(ALICE) is not None
    assert bob.call_for(ALICE).call_id == "aaa"  # type: ignore[union-attr]


def test_glare_higher_incoming_call_id_is_refused_with_replaced() -> None:
    clock = Clock()
    bob = bob_alone(clock)
    mine = bob._new_call("aaa", ALICE, "s-AAA", CallDirection.OUTGOING, CallState.INVITE_SENT)
    bob._register(mine)
    actions = bob.receive(ALICE.user_id, "m.call.invite", envelope("zzz") | INVITE_BODY)
    assert len(actions) == 1
    sent = actions[0]
    assert isinstance(sent, SendToDevice)
    assert (sent.event_type, sent.content["call_id"], sent.content["reason"]) == (
        "m.call.hangup",
        "zzz",
        "replaced",
    )
    assert sent.content["seq"] == 0
    assert bob.call_for(ALICE) is mine


def test_new_invite_replaces_an_established_call() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    first = mesh.nodes[BOB].call_for(ALICE)
    assert first is not None
    actions = mesh.nodes[BOB].receive(
        ALICE.user_id, "m.call.invite", envelope("new1") | INVITE_BODY
    )
    assert any(
        isinstance(a, SendToDevice)
        and a.content["call_id"] == first.call_id
        and a.content.get("reason") == "replaced"
        for a in actions
    )
    assert mesh.nodes[BOB].call_for(ALICE).call_id == "new1"  # type: ignore[union-attr]


# -- envelope checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        {"dest_session_id": "s-OLD"},
        {"dest_session_id": None},
        {"conf_id": "another-call"},
        {"device_id": None},
    ],
)
def test_foreign_or_incomplete_envelopes_are_dropped(override: dict[str, Any]) -> None:
    bob = bob_alone(Clock())
    content = envelope("c1") | INVITE_BODY | override
    content = {k: v for k, v in content.items() if v is not None}
    assert bob.receive(ALICE.user_id, "m.call.invite", content) == []
    assert bob.call_for(ALICE) is None


def test_garbage_and_unknown_call_are_ignored() -> None:
    bob = bob_alone(Clock())
    assert bob.receive(ALICE.user_id, "m.call.invite", {"offer": 1}) == []
    assert (
        bob.receive(
            ALICE.user_id,
            "m.call.answer",
            envelope("nope") | {"answer": {"type": "answer", "sdp": "v=0"}},
        )
        == []
    )
    assert bob.receive(ALICE.user_id, "m.call.hangup", envelope("nope", seq=None)) == []
    assert bob.calls == {}


def test_event_from_another_device_for_a_call_is_ignored() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    call = mesh.nodes[BOB].call_for(ALICE)
    assert call is not None
    forged = envelope(call.call_id, seq=None, device_id="EVE")
    assert mesh.nodes[BOB].receive("@eve:hs", "m.call.hangup", forged) == []
    assert mesh.nodes[BOB].call_for(ALICE) is call


# -- ordering --------------------------------------------------------------------------------


def test_out_of_order_events_are_delivered_in_seq_order() -> None:
    bob = bob_alone(Clock())
    cand = {"candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}]}
    # candidates (seq 1) arrive before the invite (seq 0)
    assert bob.receive(ALICE.user_id, "m.call.candidates", envelope("c1", 1) | cand) == []
    actions = bob.receive(ALICE.user_id, "m.call.invite", envelope("c1", 0) | INVITE_BODY)
    assert [type(a) for a in actions] == [SetRemoteDescription, AddIceCandidates]
    # a duplicate is dropped
    assert bob.receive(ALICE.user_id, "m.call.candidates", envelope("c1", 1) | cand) == []


def test_a_seq_gap_is_skipped_after_the_timeout() -> None:
    clock = Clock()
    bob = bob_alone(clock, SignallingConfig(gap_timeout_ms=1500))
    bob.receive(ALICE.user_id, "m.call.invite", envelope("c1", 0) | INVITE_BODY)
    # seq 1 is lost; seq 2 (hangup) waits
    assert bob.receive(ALICE.user_id, "m.call.hangup", envelope("c1", 2)) == []
    assert bob.next_deadline() == pytest.approx(clock.now + 1.5)
    clock.now += 1.4
    assert bob.tick() == []
    assert bob.call_for(ALICE) is not None
    clock.now += 0.2
    actions = bob.tick()
    assert any(isinstance(a, ClosePeerConnection) for a in actions)
    assert bob.call_for(ALICE) is None


def test_a_new_call_starting_above_zero_is_delivered_at_once() -> None:
    # Hydrogen numbers per remote device across calls: its retry's invite may carry seq 3.
    bob = bob_alone(Clock(), SignallingConfig(gap_timeout_ms=1000))
    actions = bob.receive(ALICE.user_id, "m.call.invite", envelope("c1", 3) | INVITE_BODY)
    assert any(isinstance(a, SetRemoteDescription) for a in actions)
    assert bob.next_deadline() is None


def test_a_non_opening_event_above_zero_still_waits_for_its_gap() -> None:
    clock = Clock()
    bob = bob_alone(clock, SignallingConfig(gap_timeout_ms=1000))
    bob.receive(ALICE.user_id, "m.call.invite", envelope("c1", 0) | INVITE_BODY)
    cand = {"candidates": [{"candidate": ""}]}
    assert bob.receive(ALICE.user_id, "m.call.candidates", envelope("c2", 3) | cand) == []
    clock.now += 1.0
    bob.tick()  # skipped to 3: an unknown call, dropped without error
    assert bob.next_deadline() is None


def test_events_without_seq_pass_straight_through() -> None:
    bob = bob_alone(Clock())
    actions = bob.receive(ALICE.user_id, "m.call.invite", envelope("c1", None) | INVITE_BODY)
    assert any(isinstance(a, SetRemoteDescription) for a in actions)


# -- invite lifetime and timeout -------------------------------------------------------------


def test_received_invite_too_old_is_dropped() -> None:
    bob = bob_alone(Clock())
    content = envelope("c1") | INVITE_BODY
    assert bob.receive(ALICE.user_id, "m.call.invite", content, local_age_ms=57_001) == []
    accepted = bob.receive(
        ALICE.user_id, "m.call.invite", envelope("c2") | INVITE_BODY, local_age_ms=57_000
    )
    assert any(isinstance(a, SetRemoteDescription) for a in accepted)


def test_unanswered_invite_is_hung_up_with_invite_timeout() -> None:
    clock = Clock()
    mesh = Mesh(clock, ALICE, BOB)
    mesh.blocked.add(BOB)  # Bob never receives the invite
    mesh.join(mesh.sessions(ALICE, BOB))
    call = mesh.nodes[ALICE].call_for(BOB)
    assert call is not None
    assert call.state is CallState.INVITE_SENT
    mesh.advance(59.5)
    assert mesh.nodes[ALICE].call_for(BOB) is call
    mesh.advance(0.75)
    hangups = mesh.sent(ALICE, "m.call.hangup")
    assert [h.content["reason"] for h in hangups] == ["invite_timeout"]
    assert hangups[0].content["call_id"] == call.call_id


# -- ICE failure and retries -----------------------------------------------------------------


def test_ice_failure_hangs_up_and_caller_places_a_new_call() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    old = mesh.nodes[ALICE].call_for(BOB)
    assert old is not None
    mesh.pump(ALICE, mesh.nodes[ALICE].media_failed(old.call_id))
    hangup = mesh.sent(ALICE, "m.call.hangup")
    assert [h.content["reason"] for h in hangup] == ["ice_failed"]
    new = mesh.nodes[ALICE].call_for(BOB)
    assert new is not None
    assert new.call_id != old.call_id
    assert mesh.nodes[BOB].call_for(ALICE).call_id == new.call_id  # type: ignore[union-attr]
    # seq restarts at 0 for the new call_id
    invites = mesh.sent(ALICE, "m.call.invite")
    assert [i.content["seq"] for i in invites] == [0, 0]


def test_callee_ice_failure_makes_the_caller_place_a_new_call() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    old = mesh.nodes[BOB].call_for(ALICE)
    assert old is not None
    mesh.pump(BOB, mesh.nodes[BOB].media_failed(old.call_id))
    # Bob does not call (he is not the caller) but Alice replaces the call at once.
    assert not mesh.of(CreateOffer, BOB)
    new = mesh.nodes[ALICE].call_for(BOB)
    assert new is not None
    assert new.call_id != old.call_id
    assert mesh.nodes[BOB].call_for(ALICE).call_id == new.call_id  # type: ignore[union-attr]


def test_retries_every_5s_3_times_then_every_10s() -> None:
    clock = Clock()
    mesh = Mesh(clock, ALICE, BOB, config=SignallingConfig(invite_timeout_ms=1000))
    mesh.blocked.add(BOB)
    mesh.join(mesh.sessions(ALICE, BOB))

    offer_times = [clock.now]
    seen = 1
    for _ in range(200):  # 50 s in 0.25 s steps
        mesh.advance(0.25)
        n = len(mesh.of(CreateOffer, ALICE))
        if n > seen:
            offer_times.append(clock.now)
            seen = n
    # the first call, 3 retries each 5 s after the previous call ended (1 s timeout), then
    # one every 10 s after the previous one ended for as long as Bob is a member
    gaps = [b - a for a, b in itertools.pairwise(offer_times)]
    assert gaps == [pytest.approx(6.0, abs=0.3)] * 3 + [pytest.approx(11.0, abs=0.3)] * 2


def test_no_slow_retries_when_switched_off() -> None:
    clock = Clock()
    config = SignallingConfig(invite_timeout_ms=1000, slow_retry_interval_ms=0)
    mesh = Mesh(clock, ALICE, BOB, config=config)
    mesh.blocked.add(BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    mesh.advance(60.0)
    assert len(mesh.of(CreateOffer, ALICE)) == 4
    assert mesh.nodes[ALICE].next_deadline() is None


def test_a_peer_unreachable_longer_than_the_fast_retries_is_called_again() -> None:
    """The chaos suite's lossy mesh member: its link failed for 60 s, longer than the fast
    retries last. Once it is reachable again, the caller calls again and they connect."""
    clock = Clock()
    mesh = Mesh(clock, ALICE, BOB, config=SignallingConfig(invite_timeout_ms=4000))
    mesh.join(mesh.sessions(ALICE, BOB))
    call = mesh.nodes[ALICE].call_for(BOB)
    assert call is not None
    mesh.nodes[ALICE].media_connected(call.call_id)
    mesh.blocked.add(BOB)
    mesh.pump(ALICE, mesh.nodes[ALICE].media_failed(call.call_id))
    mesh.advance(60.0)  # every call in this minute is lost
    assert mesh.nodes[ALICE]._retries[BOB] > 3
    mesh.blocked.clear()
    mesh.advance(15.0)
    new = mesh.nodes[ALICE].call_for(BOB)
    assert new is not None
    assert new.state is CallState.CONNECTING
    assert mesh.nodes[BOB].call_for(ALICE).call_id == new.call_id  # type: ignore[union-attr]


def test_retry_counter_resets_once_media_connects() -> None:
    clock = Clock()
    mesh = Mesh(clock, ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    call = mesh.nodes[ALICE].call_for(BOB)
    assert call is not None
    mesh.nodes[ALICE]._retries[BOB] = 3
    mesh.nodes[ALICE].media_connected(call.call_id)
    assert BOB not in mesh.nodes[ALICE]._retries


# -- membership changes ----------------------------------------------------------------------


def test_member_leaving_closes_exactly_its_call() -> None:
    mesh = Mesh(Clock(), ALICE, BOB, CAROL)
    mesh.join(mesh.sessions(ALICE, BOB, CAROL))
    to_carol = mesh.nodes[ALICE].call_for(CAROL)
    to_bob = mesh.nodes[ALICE].call_for(BOB)
    assert to_carol is not None
    assert to_bob is not None
    before = len(mesh.log)
    mesh.pump(ALICE, mesh.nodes[ALICE].set_members(mesh.sessions(ALICE, BOB)))
    closes = [a for w, a in mesh.log[before:] if isinstance(a, ClosePeerConnection) and w == ALICE]
    assert [c.call_id for c in closes] == [to_carol.call_id]
    assert mesh.nodes[ALICE].call_for(BOB) is to_bob
    assert mesh.nodes[ALICE].next_deadline() is None  # no retry for a departed member


def test_session_change_hangs_up_new_session_and_calls_again() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    old = mesh.nodes[ALICE].call_for(BOB)
    assert old is not None
    actions = mesh.nodes[ALICE].set_members({ALICE: "s-AAA", BOB: "s-NEW"})
    hangup = [a for a in actions if isinstance(a, SendToDevice)]
    assert [(h.content["reason"], h.content["dest_session_id"]) for h in hangup] == [
        ("new_session", "s-BBB")
    ]
    new = [a for a in actions if isinstance(a, CreateOffer)]
    assert len(new) == 1
    assert new[0].call_id != old.call_id


def test_invite_before_membership_is_held_until_membership_arrives() -> None:
    clock = Clock()
    bob = MeshSignalling(
        LocalDevice(user_id=BOB.user_id, device_id="BBB", session_id="s-BBB", conf_id=CONF),
        clock=clock,
    )
    assert bob.receive(ALICE.user_id, "m.call.invite", envelope("c1") | INVITE_BODY) == []
    actions = bob.set_members({ALICE: "s-AAA", BOB: "s-BBB"})
    assert any(isinstance(a, SetRemoteDescription) and a.call_id == "c1" for a in actions)


def test_held_invite_expires() -> None:
    clock = Clock()
    bob = MeshSignalling(
        LocalDevice(user_id=BOB.user_id, device_id="BBB", session_id="s-BBB", conf_id=CONF),
        clock=clock,
    )
    bob.receive(ALICE.user_id, "m.call.invite", envelope("c1") | INVITE_BODY)
    clock.now += 61
    bob.tick()
    assert bob.set_members({ALICE: "s-AAA", BOB: "s-BBB"}) == []


# -- the rest of the event types -------------------------------------------------------------


def test_select_answer_for_another_party_ends_answered_elsewhere() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.auto_sdp = False
    mesh.join(mesh.sessions(ALICE, BOB))
    bob = mesh.nodes[BOB]
    actions = bob.receive(ALICE.user_id, "m.call.invite", envelope("c9", None) | INVITE_BODY)
    assert actions
    bob.answer_created("c9", "answer")
    actions = bob.receive(
        ALICE.user_id, "m.call.select_answer", envelope("c9", None) | {"selected_party_id": "OTHER"}
    )
    assert [type(a) for a in actions] == [ClosePeerConnection]
    assert actions[0].reason is HangupReason.ANSWERED_ELSEWHERE  # type: ignore[union-attr]


def test_reject_ends_an_outgoing_invite_and_negotiate_is_answered() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.auto_sdp = False
    mesh.blocked.add(BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    alice = mesh.nodes[ALICE]
    call_id = mesh.of(CreateOffer, ALICE)[0].call_id
    alice.offer_created(call_id, "offer")
    env = envelope(
        call_id,
        None,
        party_id="BBB",
        device_id="BBB",
        sender_session_id="s-BBB",
        dest_session_id="s-AAA",
    )
    actions = alice.receive(BOB.user_id, "m.call.reject", env)
    assert [type(a) for a in actions] == [ClosePeerConnection]

    # negotiate: a connected callee receives a renegotiation offer and answers with negotiate
    mesh2 = Mesh(Clock(), ALICE, BOB)
    mesh2.join(mesh2.sessions(ALICE, BOB))
    bob = mesh2.nodes[BOB]
    call = bob.call_for(ALICE)
    assert call is not None
    neg = envelope(call.call_id, None) | {"description": {"type": "offer", "sdp": "v=0 re"}}
    actions = bob.receive(ALICE.user_id, "m.call.negotiate", neg)
    assert [type(a) for a in actions] == [SetRemoteDescription]
    reply = [
        a for a in bob.answer_created(call.call_id, "answer re") if isinstance(a, SendToDevice)
    ]
    assert [(a.event_type, a.content["description"]["type"]) for a in reply] == [
        ("m.call.negotiate", "answer")
    ]


def test_metadata_changed_is_reported() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    call = mesh.nodes[BOB].call_for(ALICE)
    assert call is not None
    meta = {"sdp_stream_metadata": {"st": {"purpose": "m.usermedia", "video_muted": True}}}
    actions = mesh.nodes[BOB].receive(
        ALICE.user_id, "m.call.sdp_stream_metadata_changed", envelope(call.call_id, None) | meta
    )
    assert len(actions) == 1
    assert isinstance(actions[0], RemoteStreamMetadata)
    assert actions[0].metadata["st"].video_muted


def test_a_local_metadata_change_reaches_the_peer_once_it_has_our_description() -> None:
    mesh = Mesh(Clock(), ALICE, BOB)
    mesh.auto_sdp = False
    mesh.join(mesh.sessions(ALICE, BOB))
    alice = mesh.nodes[ALICE]
    call_id = mesh.of(CreateOffer, ALICE)[0].call_id
    muted = {"st": StreamMetadata(purpose=StreamPurpose.USERMEDIA, video_muted=True)}
    assert alice.metadata_changed(call_id, muted) == []  # the invite will carry it
    assert alice.metadata_changed("no-such-call", muted) == []
    mesh.pump(ALICE, alice.offer_created(call_id, "offer"))
    mesh.pump(ALICE, alice.metadata_changed(call_id, muted))
    changed = mesh.sent(ALICE, "m.call.sdp_stream_metadata_changed")
    assert len(changed) == 1
    assert changed[0].content["sdp_stream_metadata"]["st"]["video_muted"] is True
    bob_call = mesh.nodes[BOB].call_for(ALICE)
    assert bob_call is not None
    assert bob_call.remote_metadata["st"].video_muted


def test_close_hangs_up_every_call_and_ignores_later_input() -> None:
    mesh = Mesh(Clock(), ALICE, BOB, CAROL)
    mesh.join(mesh.sessions(ALICE, BOB, CAROL))
    actions = mesh.nodes[ALICE].close()
    assert sorted(a.device_id for a in actions if isinstance(a, SendToDevice)) == ["BBB", "CCC"]
    assert all(a.content["reason"] == "user_hangup" for a in actions if isinstance(a, SendToDevice))
    assert len([a for a in actions if isinstance(a, ClosePeerConnection)]) == 2
    assert mesh.nodes[ALICE].set_members(mesh.sessions(ALICE, BOB)) == []
    assert mesh.nodes[ALICE].tick() == []


# -- property: any interleaving of inputs keeps the core consistent ----------------------------

PEERS = [ALICE, CAROL, DeviceRef("@aaa:hs", "ZZZ"), DeviceRef("@bob:hs", "AAA")]
TYPES = [
    "m.call.invite",
    "m.call.answer",
    "m.call.select_answer",
    "m.call.candidates",
    "m.call.negotiate",
    "m.call.hangup",
    "m.call.reject",
    "m.call.sdp_stream_metadata_changed",
    "m.call.unknown",
]
CALL_IDS = ["c1", "c2", "zz", "c0000AAA"]
SDP_BODIES: list[dict[str, Any]] = [
    {"offer": {"type": "offer", "sdp": "v=0"}},
    {"answer": {"type": "answer", "sdp": "v=0"}},
    {"description": {"type": "offer", "sdp": "v=0"}},
    {"description": {"type": "answer", "sdp": "v=0"}},
    {"candidates": [{"candidate": ""}]},
    {"selected_party_id": "BBB"},
    {"selected_party_id": "XXX"},
    {"reason": "ice_failed"},
    {"sdp_stream_metadata": {"s": {"purpose": "m.usermedia"}}},
    {},
]

ops = st.one_of(
    st.tuples(
        st.just("receive"),
        st.sampled_from(PEERS),
        st.sampled_from(TYPES),
        st.sampled_from(CALL_IDS),
        st.one_of(st.none(), st.integers(0, 4)),
        st.sampled_from(SDP_BODIES),
        st.sampled_from(["s-BBB", "other"]),
    ),
    st.tuples(st.just("tick"), st.floats(0, 70)),
    st.tuples(st.just("members"), st.lists(st.sampled_from(PEERS), unique=True)),
    st.tuples(
        st.just("local"),
        st.sampled_from(["offer", "answer", "fail", "up", "down"]),
        st.integers(0, 5),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=40))
def test_random_input_sequences_keep_the_core_consistent(sequence: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    node = MeshSignalling(
        LocalDevice(user_id=BOB.user_id, device_id="BBB", session_id="s-BBB", conf_id=CONF),
        clock=clock,
    )
    for op in sequence:
        if op[0] == "receive":
            _, peer, event_type, call_id, seq, body, dest = op
            content = {
                "call_id": call_id,
                "party_id": peer.device_id,
                "version": "1",
                "conf_id": CONF,
                "device_id": peer.device_id,
                "sender_session_id": f"s-{peer.device_id}",
                "dest_session_id": dest,
                **({} if seq is None else {"seq": seq}),
                **body,
            }
            node.receive(peer.user_id, event_type, content)
        elif op[0] == "tick":
            clock.now += op[1]
            node.tick()
        elif op[0] == "members":
            node.set_members({p: f"s-{p.device_id}" for p in op[1]})
        else:
            calls = list(node.calls)
            if not calls:
                continue
            call_id = calls[op[2] % len(calls)]
            {
                "offer": lambda c: node.offer_created(c, "v=0"),
                "answer": lambda c: node.answer_created(c, "v=0"),
                "fail": lambda c: node.local_failed(c, HangupReason.CREATE_ANSWER),
                "up": node.media_connected,
                "down": node.media_failed,
            }[op[1]](call_id)
        # invariants: one live call per peer, indexes agree, no ENDED call is live
        by_peer = {c.peer for c in node.calls.values()}
        assert len(by_peer) == len(node.calls)
        for call_id, call in node.calls.items():
            assert call.state is not CallState.ENDED
            assert node.call_for(call.peer) is call
            assert call.call_id == call_id
        deadline = node.next_deadline()
        assert deadline is None or deadline >= clock.now - 70


def test_each_new_gap_gets_a_full_timeout() -> None:
    clock = Clock()
    bob = bob_alone(clock, SignallingConfig(gap_timeout_ms=1000))
    cand = {"candidates": [{"candidate": ""}]}
    bob.receive(ALICE.user_id, "m.call.candidates", envelope("c1", 1) | cand)  # gap at 0
    clock.now += 0.9
    bob.receive(ALICE.user_id, "m.call.candidates", envelope("c1", 3) | cand)  # gap at 2 too
    actions = bob.receive(ALICE.user_id, "m.call.invite", envelope("c1", 0) | INVITE_BODY)
    assert [type(a) for a in actions] == [SetRemoteDescription, AddIceCandidates]
    clock.now += 0.5  # 1.4 s after the first gap opened, 0.5 s after the second
    assert bob.tick() == []
    clock.now += 0.5
    assert [type(a) for a in bob.tick()] == [AddIceCandidates]


def test_the_signalling_core_imports_no_io_library() -> None:
    code = (
        "import sys, matrixrtc.session.mesh_signalling, matrixrtc.model.voip;"
        "bad = [m for m in ('aiortc', 'aiohttp', 'nio', 'livekit', 'av') if m in sys.modules];"
        "sys.exit(','.join(bad) or None)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# -- heterogeneous mesh: a peer called under the room's 2022 call id -----------------------


def test_a_2022_peer_is_called_under_its_conf_id_and_answers_are_taken() -> None:
    clock = Clock()
    mesh = Mesh(clock, ALICE, BOB)
    legacy = "roomcall2022"
    # Alice calls Bob under the 2022 call's id; Bob (listed in that call) accepts it.
    mesh.nodes[BOB].accept_conf_id(legacy)
    mesh.pump(BOB, mesh.nodes[BOB].set_members(mesh.sessions(ALICE, BOB)))
    mesh.pump(ALICE, mesh.nodes[ALICE].set_members(mesh.sessions(ALICE, BOB), {BOB: legacy}))
    invites = mesh.sent(ALICE, "m.call.invite")
    assert [i.content["conf_id"] for i in invites] == [legacy]
    # Bob answers under the id the invite named, not its own default.
    answers = mesh.sent(BOB, "m.call.answer")
    assert [a.content["conf_id"] for a in answers] == [legacy]
    assert mesh.sent(ALICE, "m.call.select_answer")[0].content["conf_id"] == legacy
    # Another conf_id is still nobody's call.
    drop = mesh.nodes[BOB].receive(
        ALICE.user_id, "m.call.invite", {**envelope("x1", conf_id="other"), **INVITE_BODY}
    )
    assert drop == []


def test_without_conf_ids_every_peer_gets_the_session_conf_id() -> None:
    clock = Clock()
    mesh = Mesh(clock, ALICE, BOB)
    mesh.join(mesh.sessions(ALICE, BOB))
    assert {s.content["conf_id"] for s in mesh.sent()} == {CONF}
