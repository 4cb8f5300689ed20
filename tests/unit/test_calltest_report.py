"""call-test report: figures from participant reports, the table, the JSON shape; participant
configuration round trip; the mesh session id derived from a membership."""

from __future__ import annotations

import json
from typing import Any

from matrixrtc.agent import Participant
from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.calltest.runner import (
    CallTestConfig,
    ParticipantProcess,
    build_report,
    format_report,
    window_opens_ms,
)
from matrixrtc.mesh.matrix_link import mesh_session_id
from matrixrtc.model import Dialect


class _Proc(ParticipantProcess):
    """A ParticipantProcess holding given reports (no process)."""

    def __init__(self, name: str, device: str, final: dict[str, Any]) -> None:
        self.name = name
        self.ready = {"user_id": f"@{name}:hs", "device_id": device}
        self.stats = []
        self.final = final


def _peer(peer_id: str, frames: int, connected: int, first: int, end: int) -> dict[str, Any]:
    return {
        "id": peer_id,
        "connected_at_ms": connected,
        "first_frame_at_ms": first,
        "frames_decoded": frames,
        "bytes_in": 125_000 * (end - connected) // 1000,  # 1000 kbit/s
        "bytes_out": 62_500 * (end - connected) // 1000,  # 500 kbit/s
        "decrypt_failures": 0,
        "kbps_out": 0.0,
    }


def _final(joined: int, end: int, peers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "joined_at_ms": joined,
        "t_ms": end,
        "cpu_percent_avg": 12.5,
        "key_index": 1,
        "key_rotation_ms": [1040.0],
        "key_delivery_ms": [30],
        "peers": peers,
    }


def test_report_figures_and_json_shape() -> None:
    a = _Proc("a", "DA", _final(0, 10_000, [_peer("@b:hs|DB", 150, 400, 500, 10_000)]))
    b = _Proc("b", "DB", _final(100, 10_000, [_peer("@a:hs|DA", 99, 300, 1_100, 10_000)]))
    report = build_report([a, b], CallTestConfig(participants=2, duration_s=10))
    assert json.loads(json.dumps(report)) == report
    assert report["duration_s"] == 10
    assert report["fps"] == 15
    assert report["resolution"] == "320x240"
    pa, pb = report["participants"]
    assert pa["id"] == "a"
    assert pa["connect_ms"] == 400
    assert pa["first_frame_ms"] == 500
    assert pa["cpu_percent"] == 12.5
    assert pa["key_rotation_ms"] == [1040.0]
    (peer,) = pa["peers"]
    assert peer["id"] == "b"  # device ids are shown as participant names
    assert peer["fps_in"] == round(150 / 9.5, 1)
    assert peer["kbps_in"] == 1000.0
    assert peer["kbps_out"] == 500.0
    assert peer["frames_decoded"] == 150
    assert peer["decrypt_failures"] == 0
    assert pb["connect_ms"] == 200  # from its own join
    assert pb["first_frame_ms"] == 1000
    assert pb["peers"][0]["fps_in"] == round(99 / 8.9, 1)
    row = format_report(report).splitlines()[2].split()
    assert row == ["a", "400", "500", "12.5", "-", "1040.0", "30", "b", "15.8", "1000.0", "500.0",
                   "150", "0"]  # fmt: skip


def _sample(t: int, cpu_s: float, frames: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "joined_at_ms": 0,
        "t_ms": t,
        "cpu_percent": 0.0,
        "cpu_s": cpu_s,
        "rss_mb": 100.0 + t / 1000,
        "peers": [
            {"id": pid, "frames_decoded": n, "decrypt_failures": 1 if t < 3_000 else 2,
             "fps_in": 0.0}
            for pid, n in frames.items()
        ],
        **extra,
    }  # fmt: skip


def test_window_starts_after_every_pair_receives_and_settles() -> None:
    """Three participants, one receive-only: the window opens settle_s after the last one
    has a frame from every publisher; per-pair fps and CPU are deltas inside it, the
    receive-only participant is no sender, and a stalled pair sets min_fps_ratio."""
    a = _Proc("a", "DA", {})
    b = _Proc("b", "DB", {})
    v = _Proc("v", "DV", {})
    a.final = b.final = v.final = None
    for t in range(1_000, 11_000, 1_000):
        k = (t - 1_000) // 1_000  # seconds since the first report
        # a hears b from the start at 15 fps; b hears a only from t=4000, at 15 fps
        a.stats.append(_sample(t, 0.2 * k, {"@b:hs|DB": 15 * k, "@v:hs|DV": 0}))
        b.stats.append(_sample(t, 0.1 * k, {"@a:hs|DA": max(0, 15 * (k - 3))}))
        # v gets a at 15 fps but b stalls at 7.5 fps
        v.stats.append(
            _sample(t, 0.05 * k, {"@a:hs|DA": 15 * k, "@b:hs|DB": 7 * k + k // 2},
                    receive_only=True)
        )  # fmt: skip
    cfg = CallTestConfig(participants=3, duration_s=10, settle_s=2.0)
    # What a --window run waits for, live: nothing while b has no frame from a yet.
    full = [p.stats for p in (a, b, v)]
    for p in (a, b, v):
        p.stats = p.stats[:4]
    assert window_opens_ms([a, b, v], cfg) is None
    a.stats, b.stats, v.stats = full
    assert window_opens_ms([a, b, v], cfg) == 7_000
    w = build_report([a, b, v], cfg, end_ms=10_000)["window"]
    assert w["all_pairs_received"] is True
    assert w["start_ms"] == 5_000 + 2_000  # b first has a frame in its t=5000 report
    assert w["end_ms"] == 10_000
    pairs = {(x["receiver"], x["sender"]): x for x in w["pairs"]}
    assert set(pairs) == {("a", "b"), ("b", "a"), ("v", "a"), ("v", "b")}  # v sends nothing
    assert pairs[("a", "b")]["fps"] == 15.0
    assert pairs[("b", "a")]["fps_ratio"] == 1.0
    assert 0.45 < pairs[("v", "b")]["fps_ratio"] < 0.55
    assert w["min_fps_ratio"] == pairs[("v", "b")]["fps_ratio"]
    cpu = {x["id"]: x["cpu_percent"] for x in w["participants"]}
    assert cpu == {"a": 20.0, "b": 10.0, "v": 5.0}
    assert w["cpu_percent_per_participant"] == round(35 / 3, 1)
    assert w["memory_mb_per_participant"] == 110.0
    assert w["decrypt_failures"] == 0  # the start-up failures are before the window
    assert [x["receive_only"] for x in w["participants"]] == [False, False, True]


def test_window_when_a_pair_never_receives() -> None:
    a = _Proc("a", "DA", {})
    b = _Proc("b", "DB", {})
    a.final = b.final = None
    for t in range(1_000, 9_000, 1_000):
        a.stats.append(_sample(t, 0.0, {"@b:hs|DB": 0}))
        b.stats.append(_sample(t, 0.0, {"@a:hs|DA": 15 * t // 1000}))
    w = build_report([a, b], CallTestConfig(participants=2, duration_s=8))["window"]
    assert w["all_pairs_received"] is False
    assert w["min_fps_ratio"] == 0.0
    assert w["end_ms"] == 8_000


def test_report_of_a_silent_participant_and_table() -> None:
    a = _Proc("a", "DA", _final(0, 5_000, []))
    silent = _Proc("s", "DS", {})
    silent.final = None
    report = build_report([a, silent], CallTestConfig(participants=2, duration_s=5))
    assert report["participants"][1] == {"id": "s", "error": "no report", "peers": []}
    assert report["participants"][0]["connect_ms"] is None
    table = format_report(report)
    assert table.splitlines()[0].startswith("mesh call: 2 participants, 320x240 @ 15 fps, 5 s")
    assert "decrypt fail" in table.splitlines()[1]
    assert table.splitlines()[2].split()[:2] == ["a", "-"]


def test_participant_config_round_trips_through_json() -> None:
    cfg = ParticipantConfig(
        name="p1",
        homeserver="http://127.0.0.1:1",
        user="@u:hs",
        password="pw",
        room_id="!r",
        turn_uris=("turn:127.0.0.1:3478?transport=udp",),
        host_addresses=("127.0.0.1",),
    )
    assert ParticipantConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def _member(member_id: str, created_ts: int) -> Participant:
    return Participant(
        user_id="@u:hs",
        device_id="D",
        member_id=member_id,
        dialect=Dialect.STATE,
        created_ts=created_ts,
        event_id="$e",
        intent=None,
        transport=None,
        rtc_backend_identity="@u:hs:D",
        is_self=False,
    )


def test_mesh_session_id_changes_with_a_rejoin_only() -> None:
    first = mesh_session_id(_member("@u:hs:D", 1000))
    assert mesh_session_id(_member("@u:hs:D", 1000)) == first  # a refresh keeps created_ts
    assert mesh_session_id(_member("@u:hs:D", 2000)) != first  # a rejoin is a new session
    assert mesh_session_id(_member("other", 1000)) != first


def test_a_pair_not_decoded_counts_its_received_frames() -> None:
    """--decode-video: a receiver that does not decode a peer's video is judged on the frames
    it received and decrypted from that peer; a decoded pair still on decoded frames."""
    a = _Proc("a", "DA", {})
    b = _Proc("b", "DB", {})
    c = _Proc("c", "DC", {})
    a.final = b.final = c.final = None
    for t in range(1_000, 9_000, 1_000):
        k = (t - 1_000) // 1_000
        for p, others in ((a, "bc"), (b, "ac"), (c, "ab")):
            s = _sample(t, 0.1 * k, {f"@{o}:hs|D{o.upper()}": 15 * k for o in others})
            # the second peer is received (15 fps) but not decoded (no decoded frame)
            second = s["peers"][1]
            second.update(frames_decoded=0, frames_received=15 * k, video_decoded=False)
            if p is c:
                second["frames_received"] = 5 * k  # c gets b's frames at 5 fps only
            p.stats.append(s)
    w = build_report([a, b, c], CallTestConfig(participants=3, settle_s=1.0), end_ms=8_000)[
        "window"
    ]
    assert w["all_pairs_received"] is True
    pairs = {(x["receiver"], x["sender"]): x for x in w["pairs"]}
    assert pairs[("a", "b")]["decoded"] is True
    assert pairs[("a", "c")]["decoded"] is False
    assert pairs[("a", "c")]["fps_ratio"] == 1.0
    assert pairs[("c", "b")]["decoded"] is False
    assert w["min_fps_ratio"] == pairs[("c", "b")]["fps_ratio"] < 0.4


def _counters(frames: int, **more: int) -> dict[str, int]:
    return {"frames_in": frames, "frames_encoded": frames, "keyframes": 0,
            "keyframe_requests": 0, "overflows": 0, **more}  # fmt: skip


def test_window_states_what_each_publisher_sent() -> None:
    """Per publisher, from its encoder counters: the video it encoded per second in the
    window over every transport it published on (an encoder that appears mid-window, as in a
    switch, counts from zero), key frames, requests and queue overflows. A sender that
    encodes a third of the frames shows as that, apart from the receivers."""
    a = _Proc("a", "DA", {})
    b = _Proc("b", "DB", {})
    v = _Proc("v", "DV", {})
    a.final = b.final = v.final = None
    for t in range(1_000, 11_000, 1_000):
        k = (t - 1_000) // 1_000
        a.stats.append(_sample(t, 0.1 * k, {"@b:hs|DB": 5 * k}, encoders={
            "mesh": {"video": _counters(15 * k, keyframes=k, keyframe_requests=2 * k),
                     "audio": _counters(50 * k, overflows=k // 3)},
        }))  # fmt: skip
        # b encodes only 5 fps; from t=6000 also on the SFU (a second encoder from 0)
        enc = {"mesh": {"video": _counters(5 * k, overflows=k)}}
        if t >= 6_000:
            # simulcast: the smallest layer as "video", the full one encoding 15 fps till 8000
            enc["sfu"] = {"video": _counters(5 * (k - 5)), "video/h": _counters(15 * min(k - 5, 2))}
        b.stats.append(_sample(t, 0.1 * k, {"@a:hs|DA": 15 * k}, encoders=enc))
        v.stats.append(_sample(t, 0.0, {"@a:hs|DA": 15 * k, "@b:hs|DB": 5 * k},
                               receive_only=True, encoders={}))  # fmt: skip
    cfg = CallTestConfig(participants=3, settle_s=1.0)
    w = build_report([a, b, v], cfg, end_ms=10_000)["window"]
    sent = {x["id"]: x.get("sent") for x in w["participants"]}
    assert w["start_ms"] == 3_000  # every pair has a frame at t=2000, plus the settle
    assert sent["v"] is None  # sends nothing
    assert sent["a"] == {
        "larger_layers_fps": {},
        "video_fps_source": 15.0, "video_fps_encoded": 15.0, "keyframes": 7,
        "keyframe_requests": 14, "video_overflows": 0, "audio_overflows": 3,
    }  # fmt: skip
    # 7 s: mesh 35 frames, SFU 20 (5 fps from t=6000) → 55 / 7
    assert sent["b"]["video_fps_encoded"] == round(55 / 7, 2)
    assert sent["b"]["video_overflows"] == 7
    assert sent["b"]["larger_layers_fps"] == {"h": round(30 / 7, 2)}  # the SFU's larger layer
    assert w["min_sent_video_fps"] == sent["b"]["video_fps_encoded"]
    assert w["min_fps_ratio"] < 0.4  # the receivers' ratio: against 15 fps, as before


def test_window_without_encoder_counters() -> None:
    a = _Proc("a", "DA", {})
    b = _Proc("b", "DB", {})
    a.final = b.final = None
    for t in range(1_000, 6_000, 1_000):
        a.stats.append(_sample(t, 0.0, {"@b:hs|DB": 15 * t // 1000}))
        b.stats.append(_sample(t, 0.0, {"@a:hs|DA": 15 * t // 1000}))
    w = build_report([a, b], CallTestConfig(participants=2, settle_s=1.0))["window"]
    assert w["min_sent_video_fps"] is None
    assert all("sent" not in x for x in w["participants"])
