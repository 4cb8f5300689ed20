"""MSC2746 to-device call event models: round trips, interop rules, and never raising."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixrtc.model.voip import (
    MAX_CANDIDATES,
    MAX_SDP_LENGTH,
    STREAM_METADATA_KEY,
    UNSTABLE_STREAM_METADATA_KEY,
    CallAnswer,
    CallCandidates,
    CallEnvelope,
    CallEvent,
    CallEventType,
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
    StreamPurpose,
    parse_call_event,
)

ENV = CallEnvelope(
    call_id="1700000000000abcDEF0123456789._~-",
    party_id="DEVICEA",
    conf_id="conf",
    device_id="DEVICEA",
    sender_session_id="sessA",
    dest_session_id="sessB",
    seq=3,
)
META = {"stream1": StreamMetadata(purpose=StreamPurpose.USERMEDIA, video_muted=True)}
SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"

EXAMPLES: list[CallEvent] = [
    CallInvite(
        envelope=ENV,
        offer=SessionDescription(type="offer", sdp=SDP),
        invitee="@bob:hs",
        stream_metadata=META,
    ),
    CallAnswer(
        envelope=ENV, answer=SessionDescription(type="answer", sdp=SDP), stream_metadata=META
    ),
    CallSelectAnswer(envelope=ENV, selected_party_id="DEVICEB"),
    CallCandidates(
        envelope=ENV,
        candidates=(
            IceCandidate(candidate="candidate:1 1 udp 1 127.0.0.1 5000 typ host", sdp_mid="0"),
            IceCandidate(candidate=""),
        ),
    ),
    CallNegotiate(envelope=ENV, description=SessionDescription(type="answer", sdp=SDP)),
    CallHangup(envelope=ENV, reason=HangupReason.ICE_FAILED),
    CallReject(envelope=ENV),
    CallSdpStreamMetadataChanged(envelope=ENV, stream_metadata=META),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.event_type)
def test_round_trip_through_json(event: CallEvent) -> None:
    content = json.loads(json.dumps(event.to_content()))
    assert parse_call_event(str(event.event_type), content) == event


def test_envelope_fields_are_all_written() -> None:
    content = EXAMPLES[0].to_content()
    assert content["version"] == "1"
    for key in (
        "call_id",
        "party_id",
        "conf_id",
        "device_id",
        "sender_session_id",
        "dest_session_id",
        "seq",
    ):
        assert key in content


def test_stream_metadata_written_under_both_keys_and_read_from_either() -> None:
    content = EXAMPLES[0].to_content()
    assert content[STREAM_METADATA_KEY] == content[UNSTABLE_STREAM_METADATA_KEY]
    del content[STREAM_METADATA_KEY]  # a Hydrogen peer
    parsed = parse_call_event("m.call.invite", content)
    assert isinstance(parsed, CallInvite)
    assert parsed.stream_metadata == META


def test_version_int_zero_is_v0_and_anything_else_is_one() -> None:
    base = ENV.to_content() | {"reason": "user_hangup"}
    assert (parsed := parse_call_event("m.call.hangup", base | {"version": 0})) is not None
    assert parsed.envelope.version == "0"
    for other in ("1", 1, "2", "x", 7):
        parsed = parse_call_event("m.call.hangup", base | {"version": other})
        assert parsed is not None
        assert parsed.envelope.version == "1"
    assert (
        parse_call_event("m.call.hangup", {k: v for k, v in base.items() if k != "version"}) is None
    )


def test_hangup_reason_tolerates_unknown_codes_and_defaults_to_user_hangup() -> None:
    base = ENV.to_content()
    parsed = parse_call_event("m.call.hangup", base | {"reason": "org.example.new"})
    assert isinstance(parsed, CallHangup)
    assert parsed.reason == "org.example.new"
    assert not parsed.reason.known
    assert parsed.to_content()["reason"] == "org.example.new"
    parsed = parse_call_event("m.call.hangup", base)
    assert isinstance(parsed, CallHangup)
    assert parsed.reason is HangupReason.USER_HANGUP
    assert HangupReason("invite_timeout") is HangupReason.INVITE_TIMEOUT


@pytest.mark.parametrize(
    "call_id", ["", "has space", "slash/", "x" * 256, 5, None, "ünïcode", "a\nb"]
)
def test_call_id_grammar(call_id: object) -> None:
    content = ENV.to_content() | {"call_id": call_id}
    assert parse_call_event("m.call.hangup", content) is None


def test_call_id_at_max_length_accepted() -> None:
    assert parse_call_event("m.call.hangup", ENV.to_content() | {"call_id": "a" * 255}) is not None


@pytest.mark.parametrize("seq", [-1, 1.5, "3", True, 2**53])
def test_seq_must_be_a_json_safe_non_negative_integer(seq: object) -> None:
    assert parse_call_event("m.call.hangup", ENV.to_content() | {"seq": seq}) is None


def test_oversized_sdp_is_rejected() -> None:
    content = EXAMPLES[0].to_content()
    content["offer"] = {"type": "offer", "sdp": "a" * (MAX_SDP_LENGTH + 1)}
    assert parse_call_event("m.call.invite", content) is None
    content["offer"] = {"type": "offer", "sdp": "a" * MAX_SDP_LENGTH}
    assert parse_call_event("m.call.invite", content) is not None


def test_too_many_candidates_rejected() -> None:
    content = ENV.to_content() | {"candidates": [{"candidate": ""}] * (MAX_CANDIDATES + 1)}
    assert parse_call_event("m.call.candidates", content) is None


@pytest.mark.parametrize(
    ("event_type", "bad"),
    [
        ("m.call.invite", {"offer": {"type": "answer", "sdp": SDP}}),
        ("m.call.invite", {"offer": "v=0"}),
        ("m.call.answer", {"answer": {"type": "answer", "sdp": ""}}),
        ("m.call.select_answer", {"selected_party_id": 3}),
        ("m.call.candidates", {"candidates": []}),
        ("m.call.candidates", {"candidates": [{"candidate": 1}]}),
        ("m.call.negotiate", {"description": {"type": "pranswer", "sdp": SDP}}),
        ("m.call.sdp_stream_metadata_changed", {}),
        ("m.call.invite", {"offer": {"type": "offer", "sdp": SDP}, "lifetime": -5}),
        (
            "m.call.invite",
            {"offer": {"type": "offer", "sdp": SDP}, "sdp_stream_metadata": {"s": {"purpose": 1}}},
        ),
    ],
)
def test_invalid_bodies_are_dropped(event_type: str, bad: dict[str, Any]) -> None:
    assert parse_call_event(event_type, ENV.to_content() | bad) is None


def test_unknown_type_and_non_object_content() -> None:
    assert parse_call_event("m.call.transfer", ENV.to_content()) is None
    assert parse_call_event("m.call.invite", [1, 2]) is None
    assert parse_call_event(None, {}) is None


def test_unknown_stream_purpose_is_kept() -> None:
    content = EXAMPLES[7].to_content()
    content[STREAM_METADATA_KEY] = {"s": {"purpose": "org.example.cam2"}}
    parsed = parse_call_event("m.call.sdp_stream_metadata_changed", content)
    assert isinstance(parsed, CallSdpStreamMetadataChanged)
    assert parsed.stream_metadata["s"].purpose == "org.example.cam2"


# -- property tests -----------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
EVENT_TYPES = [str(t) for t in CallEventType] + ["m.call.unknown", ""]
KEYS = [
    "call_id",
    "party_id",
    "version",
    "conf_id",
    "device_id",
    "sender_session_id",
    "dest_session_id",
    "seq",
    "offer",
    "answer",
    "description",
    "candidates",
    "selected_party_id",
    "reason",
    "lifetime",
    "capabilities",
    STREAM_METADATA_KEY,
    UNSTABLE_STREAM_METADATA_KEY,
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EVENT_TYPES), json_values)
def test_arbitrary_json_never_raises(event_type: str, content: object) -> None:
    parse_call_event(event_type, content)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(range(len(EXAMPLES))),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4),
    st.lists(st.sampled_from(KEYS), max_size=3),
)
def test_mutated_valid_events_never_raise(
    index: int, overrides: dict[str, object], removed: list[str]
) -> None:
    event = EXAMPLES[index]
    content = event.to_content() | overrides
    for key in removed:
        content.pop(key, None)
    parsed = parse_call_event(str(event.event_type), content)
    if parsed is not None:
        # Whatever we accept must serialise and parse back to the same value.
        again = parse_call_event(str(event.event_type), json.loads(json.dumps(parsed.to_content())))
        assert again == parsed


def test_v0_round_trip_keeps_integer_version() -> None:
    parsed = parse_call_event("m.call.hangup", ENV.to_content() | {"version": 0})
    assert parsed is not None
    assert parsed.to_content()["version"] == 0
    assert parse_call_event("m.call.hangup", parsed.to_content()) == parsed
