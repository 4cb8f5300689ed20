"""The signalling core against models of the two deployed MSC3401 mesh receivers.

``HydrogenQueue`` and ``JsSdkQueue`` restate, in a few lines each, what hydrogen-web
(``src/matrix/calls/group/Member.ts``: which types reach the queue, ``canDequeueNextSignalling
Message``) and legacy matrix-js-sdk (``callEventHandler.onToDeviceEvent``) do with ``seq``.
They are test oracles written from reading those files, not their code. Everything our core
sends must come out of both queues, in order, with nothing held back.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matrixrtc.session.mesh_signalling import (
    CreateOffer,
    DeviceRef,
    LocalDevice,
    MeshSignalling,
    RemoteStreamMetadata,
    SendToDevice,
    SetRemoteDescription,
    SignallingAction,
    mesh_conf_id,
)

CONF = mesh_conf_id("!legacy:hs")
US = DeviceRef("@alice:hs", "AAA")  # sorts lower: we call
HYDROGEN = DeviceRef("@bob:hs", "BBB")

_HYDROGEN_TYPES = {
    "m.call.invite",
    "m.call.candidates",
    "m.call.answer",
    "m.call.hangup",
    "m.call.negotiate",
    "m.call.sdp_stream_metadata_changed",
    "org.matrix.call.sdp_stream_metadata_changed",
}


@dataclass
class HydrogenQueue:
    """One Hydrogen ``MemberConnection``'s receive side (seq across call_ids)."""

    call_id: str | None = None
    last_processed: int | None = None
    last_ignored: int | None = None
    queue: list[tuple[int, str, Mapping[str, Any]]] = field(default_factory=list)
    handled: list[tuple[str, str]] = field(default_factory=list)  # (type, call_id)

    def receive(self, event_type: str, content: Mapping[str, Any]) -> None:
        if event_type not in _HYDROGEN_TYPES:
            return  # dropped before the queue: select_answer, reject, ...
        if event_type == "m.call.invite" and content["call_id"] != self.call_id:
            self.call_id = content["call_id"]
        bisect.insort(self.queue, (content["seq"], event_type, content), key=lambda x: x[0])
        while self.queue and self._can_dequeue(self.queue[0][0]):
            seq, ty, c = self.queue.pop(0)
            if c["call_id"] == self.call_id:
                self.handled.append((ty, c["call_id"]))
                self.last_processed = seq
            else:
                self.last_ignored = seq

    def _can_dequeue(self, first: int) -> bool:
        if self.last_ignored is not None and first == self.last_ignored + 1:
            return True
        if self.last_processed is None:
            return first == 0
        return first <= self.last_processed + 1


@dataclass
class JsSdkQueue:
    """Legacy js-sdk's ``CallEventHandler`` to-device ordering (per call_id from 0)."""

    next_seq: dict[str, int] = field(default_factory=dict)
    buffers: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    handled: list[tuple[str, str]] = field(default_factory=list)

    def receive(self, event_type: str, content: Mapping[str, Any]) -> None:
        call_id = content["call_id"]
        self.next_seq.setdefault(call_id, 0)
        seq = content.get("seq")
        if seq is None:
            self.handled.append((event_type, call_id))
            return
        if seq != self.next_seq[call_id]:
            bisect.insort(self.buffers.setdefault(call_id, []), (seq, event_type))
            return
        self.handled.append((event_type, call_id))
        self.next_seq[call_id] = seq + 1
        buffer = self.buffers.get(call_id, [])
        while buffer and buffer[0][0] == self.next_seq[call_id]:
            seq, ty = buffer.pop(0)
            self.handled.append((ty, call_id))
            self.next_seq[call_id] = seq + 1


def us(clock: list[float]) -> MeshSignalling:
    node = MeshSignalling(
        LocalDevice(user_id=US.user_id, device_id=US.device_id, session_id="s-us", conf_id=CONF),
        clock=lambda: clock[0],
    )
    return node


def peer_envelope(call_id: str, seq: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "call_id": call_id,
        "party_id": HYDROGEN.device_id,
        "version": 1,
        "conf_id": CONF,
        "device_id": HYDROGEN.device_id,
        "sender_session_id": "s-peer",
        "dest_session_id": "s-us",
    }
    if seq is not None:
        out["seq"] = seq
    return out


def sends(actions: Sequence[SignallingAction]) -> list[SendToDevice]:
    return [a for a in actions if isinstance(a, SendToDevice)]


def run_outgoing_call(node: MeshSignalling, answer_seq: int) -> tuple[str, list[SendToDevice]]:
    """We call the peer, it answers (its counter at ``answer_seq``), then we hang up."""
    out: list[SendToDevice] = []
    actions = node.set_members({US: "s-us", HYDROGEN: "s-peer"})
    offer = next(a for a in actions if isinstance(a, CreateOffer))
    out += sends(node.offer_created(offer.call_id, "v=0 offer"))
    answer = peer_envelope(offer.call_id, answer_seq) | {
        "answer": {"type": "answer", "sdp": "v=0 answer"}
    }
    reply = node.receive(HYDROGEN.user_id, "m.call.answer", answer)
    assert any(isinstance(a, SetRemoteDescription) for a in reply)
    out += sends(reply)
    out += sends(node.close())
    return offer.call_id, out


def test_hydrogen_receives_everything_we_send_as_caller_including_the_hangup() -> None:
    _call_id, out = run_outgoing_call(us([0.0]), answer_seq=0)
    assert [m.event_type for m in out] == [
        "m.call.invite",
        "m.call.candidates",
        "m.call.select_answer",
        "m.call.hangup",
    ]
    hydrogen = HydrogenQueue()
    for m in out:
        hydrogen.receive(m.event_type, m.content)
    assert [t for t, _c in hydrogen.handled] == [
        "m.call.invite",
        "m.call.candidates",
        "m.call.hangup",
    ]
    assert hydrogen.queue == []


def test_legacy_js_sdk_receives_everything_we_send_as_caller_in_order() -> None:
    _call_id, out = run_outgoing_call(us([0.0]), answer_seq=0)
    js = JsSdkQueue()
    for m in out:
        js.receive(m.event_type, m.content)
    assert [t for t, _c in js.handled] == [m.event_type for m in out]
    assert all(not b for b in js.buffers.values())


def test_hydrogen_answer_numbered_by_its_device_counter_is_taken_at_once() -> None:
    # Hydrogen's counter runs across calls: a second call's answer can carry seq 6.
    node = us([0.0])
    actions = node.set_members({US: "s-us", HYDROGEN: "s-peer"})
    offer = next(a for a in actions if isinstance(a, CreateOffer))
    node.offer_created(offer.call_id, "v=0 offer")
    cand = peer_envelope(offer.call_id, 7) | {"candidates": [{"candidate": ""}]}
    assert node.receive(HYDROGEN.user_id, "m.call.candidates", cand) == []  # before the answer
    answer = peer_envelope(offer.call_id, 6) | {"answer": {"type": "answer", "sdp": "v=0 a"}}
    reply = node.receive(HYDROGEN.user_id, "m.call.answer", answer)
    kinds = [type(a).__name__ for a in reply]
    assert kinds == ["SetRemoteDescription", "SendToDevice", "AddIceCandidates"]
    assert node.next_deadline() is None  # nothing waits for a gap


def test_a_hydrogen_retry_invite_is_answered_and_hydrogen_takes_our_answer() -> None:
    # We sort higher here, so the Hydrogen device calls us.
    node = MeshSignalling(
        LocalDevice(user_id="@zed:hs", device_id="ZZZ", session_id="s-us", conf_id=CONF),
        clock=lambda: 0.0,
    )
    node.set_members({DeviceRef("@zed:hs", "ZZZ"): "s-us", HYDROGEN: "s-peer"})
    hydrogen = HydrogenQueue()
    for call_id, first_seq in (("c1", 0), ("c2", 3)):
        invite = peer_envelope(call_id, first_seq) | {
            "offer": {"type": "offer", "sdp": "v=0"},
            "lifetime": 60000,
        }
        actions = node.receive(HYDROGEN.user_id, "m.call.invite", invite)
        assert any(isinstance(a, SetRemoteDescription) for a in actions), call_id
        hydrogen.call_id = call_id  # Hydrogen's PeerCall for its own invite
        for m in sends(actions) + sends(node.answer_created(call_id, "v=0 answer")):
            hydrogen.receive(m.event_type, m.content)
        cand = peer_envelope(call_id, first_seq + 1) | {"candidates": [{"candidate": ""}]}
        node.receive(HYDROGEN.user_id, "m.call.candidates", cand)
    assert ("m.call.answer", "c2") in hydrogen.handled
    assert hydrogen.queue == []


def test_mute_metadata_is_read_under_both_event_types() -> None:
    node = us([0.0])
    actions = node.set_members({US: "s-us", HYDROGEN: "s-peer"})
    offer = next(a for a in actions if isinstance(a, CreateOffer))
    node.offer_created(offer.call_id, "v=0 offer")
    node.receive(
        HYDROGEN.user_id,
        "m.call.answer",
        peer_envelope(offer.call_id, 0) | {"answer": {"type": "answer", "sdp": "v=0 a"}},
    )
    for seq, event_type in enumerate(
        ("org.matrix.call.sdp_stream_metadata_changed", "m.call.sdp_stream_metadata_changed"),
        start=1,
    ):
        muted = event_type.startswith("org.")
        content = peer_envelope(offer.call_id, seq) | {
            "org.matrix.msc3077.sdp_stream_metadata": {
                "s1": {"purpose": "m.usermedia", "audio_muted": muted, "video_muted": False}
            }
        }
        reported = node.receive(HYDROGEN.user_id, event_type, content)
        assert len(reported) == 1
        assert isinstance(reported[0], RemoteStreamMetadata)
        assert reported[0].metadata["s1"].audio_muted is muted
