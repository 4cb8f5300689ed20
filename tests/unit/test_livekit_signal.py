"""LiveKit signalling, sans I/O (matrixrtc.livekit.signal): the /rtc URL, SignalResponse
decoding into events, SignalRequest encoding, and the trickle candidate JSON."""

from __future__ import annotations

import contextlib
import json
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from livekit.protocol import models as lk_models
from livekit.protocol import rtc as lk_rtc

from matrixrtc.livekit import signal

CANDIDATE = "842163049 1 udp 1677729535 127.0.0.1 50000 typ host"


def test_rtc_url_carries_token_protocol_and_auto_subscribe() -> None:
    url = signal.rtc_url("http://127.0.0.1:7880/base/", "tok en")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("ws", "127.0.0.1:7880", "/base/rtc")
    query = parse_qs(parts.query)
    assert query["access_token"] == ["tok en"]
    assert query["auto_subscribe"] == ["1"]
    assert query["protocol"] == [str(signal.PROTOCOL_VERSION)]
    assert urlsplit(signal.rtc_url("wss://sfu.example", "t")).scheme == "wss"
    with pytest.raises(ValueError, match="not a LiveKit URL"):
        signal.rtc_url("ftp://x", "t")


def test_join_response_decodes_to_joined_with_the_others_tracks() -> None:
    other = lk_models.ParticipantInfo(
        sid="PA_2",
        identity="@b:hs:DEV",
        tracks=[
            lk_models.TrackInfo(
                sid="TR_v",
                type=lk_models.TrackType.VIDEO,
                width=320,
                height=240,
                encryption=lk_models.Encryption.GCM,
            ),
            lk_models.TrackInfo(sid="TR_a", type=lk_models.TrackType.AUDIO),
        ],
    )
    data = lk_rtc.SignalResponse(
        join=lk_rtc.JoinResponse(
            room=lk_models.Room(name="r"),
            participant=lk_models.ParticipantInfo(sid="PA_1", identity="me"),
            other_participants=[other],
            server_version="1.13.5",
            subscriber_primary=True,
            ping_interval=5,
            ping_timeout=15,
        )
    ).SerializeToString()
    joined = signal.decode(data)
    assert isinstance(joined, signal.Joined)
    assert (joined.identity, joined.room_name, joined.others) == ("me", "r", ("@b:hs:DEV",))
    assert (joined.ping_interval_s, joined.ping_timeout_s, joined.subscriber_primary) == (
        5,
        15,
        True,
    )
    video, audio = joined.tracks
    assert (video.track_sid, video.kind, video.width, video.encrypted) == (
        "TR_v",
        "video",
        320,
        True,
    )
    assert (audio.kind, audio.encrypted) == ("audio", False)


def test_offer_trickle_pong_leave_and_unknown_messages() -> None:
    offer = signal.decode(
        lk_rtc.SignalResponse(
            offer=lk_rtc.SessionDescription(
                type="offer", sdp="v=0", id=7, mid_to_track_id={"1": "TR_v"}
            )
        ).SerializeToString()
    )
    assert offer == signal.Offer(sdp="v=0", id=7, mid_to_track_id=(("1", "TR_v"),))
    init = json.dumps({"candidate": "candidate:" + CANDIDATE, "sdpMid": "0", "sdpMLineIndex": 0})
    trickle = signal.decode(
        lk_rtc.SignalResponse(
            trickle=lk_rtc.TrickleRequest(candidateInit=init, target=lk_rtc.SignalTarget.SUBSCRIBER)
        ).SerializeToString()
    )
    assert trickle == signal.Trickle(
        target="subscriber",
        candidate=signal.Candidate(candidate=CANDIDATE, sdp_mid="0", sdp_mline_index=0),
        final=False,
    )
    pong = signal.decode(
        lk_rtc.SignalResponse(
            pong_resp=lk_rtc.Pong(last_ping_timestamp=11, timestamp=12)
        ).SerializeToString()
    )
    assert pong == signal.Pong(last_ping_ms=11, server_ms=12)
    left = signal.decode(
        lk_rtc.SignalResponse(
            leave=lk_rtc.LeaveRequest(reason=lk_models.DisconnectReason.SERVER_SHUTDOWN)
        ).SerializeToString()
    )
    assert isinstance(left, signal.Left)
    assert left.reason == lk_models.DisconnectReason.SERVER_SHUTDOWN
    assert signal.decode(
        lk_rtc.SignalResponse(refresh_token="x").SerializeToString()
    ) == signal.Other(field="refresh_token")


def test_garbage_is_a_decode_error() -> None:
    with pytest.raises(signal.SignalDecodeError):
        signal.decode(b"\xff\xff\xff")


def test_requests_encode_to_signal_requests() -> None:
    answer = lk_rtc.SignalRequest.FromString(signal.encode_answer("v=0", offer_id=7))
    assert (answer.answer.type, answer.answer.sdp, answer.answer.id) == ("answer", "v=0", 7)
    ping = lk_rtc.SignalRequest.FromString(signal.encode_ping(1234, rtt_ms=5))
    assert (ping.ping_req.timestamp, ping.ping_req.rtt) == (1234, 5)
    leave = lk_rtc.SignalRequest.FromString(signal.encode_leave())
    assert leave.WhichOneof("message") == "leave"
    assert leave.leave.reason == lk_models.DisconnectReason.CLIENT_INITIATED
    add = lk_rtc.SignalRequest.FromString(
        signal.encode_add_track(cid="c", name="v", kind="video", width=320, height=240)
    )
    assert (add.add_track.type, add.add_track.encryption) == (
        lk_models.TrackType.VIDEO,
        lk_models.Encryption.GCM,
    )


_candidates = st.builds(
    signal.Candidate,
    candidate=st.text(min_size=1).filter(lambda s: s.strip() != ""),
    sdp_mid=st.none() | st.text(max_size=8),
    sdp_mline_index=st.none() | st.integers(min_value=0, max_value=64),
)


@given(_candidates, st.sampled_from(["publisher", "subscriber"]))
def test_trickle_round_trips_through_candidate_json(
    candidate: signal.Candidate, target: signal.Target
) -> None:
    request = lk_rtc.SignalRequest.FromString(signal.encode_trickle(candidate, target))
    parsed = signal.parse_candidate_init(request.trickle.candidateInit)
    expected = candidate.candidate.removeprefix("candidate:")
    if not expected.strip():
        assert parsed is None
        return
    assert parsed == signal.Candidate(
        candidate=expected, sdp_mid=candidate.sdp_mid, sdp_mline_index=candidate.sdp_mline_index
    )
    back = lk_rtc.SignalResponse(trickle=request.trickle).SerializeToString()
    event = signal.decode(back)
    assert isinstance(event, signal.Trickle)
    assert event.target == target


@given(st.text())
def test_candidate_json_never_raises_anything_but_decode_error(text: str) -> None:
    with contextlib.suppress(signal.SignalDecodeError):
        signal.parse_candidate_init(text)


@pytest.mark.parametrize(
    "init",
    ['{"candidate": 5}', '{"candidate": "x", "sdpMLineIndex": -1}', "[]", '{"sdpMid": 3}'],
)
def test_malformed_candidate_json_is_rejected(init: str) -> None:
    with pytest.raises(signal.SignalDecodeError):
        signal.parse_candidate_init(init)


def test_empty_candidate_is_end_of_candidates() -> None:
    assert signal.parse_candidate_init('{"candidate": ""}') is None
