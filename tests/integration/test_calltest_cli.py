"""``python -m matrixrtc call-test --json`` end to end: embedded Synapse, three participant
processes (the third ``--receive-only``), one JSON object with the documented fields."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


async def test_call_test_json_report(tmp_path: Path) -> None:
    page = tmp_path / "call.html"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "matrixrtc",
        "call-test",
        "--participants",
        "3",
        "--receive-only",
        "1",
        "--duration",
        "5",
        "--json",
        "--html",
        str(page),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    assert report["duration_s"] == 5
    assert report["fps"] == 15
    assert report["resolution"] == "320x240"
    ids = [p["id"] for p in report["participants"]]
    assert ids == ["p1", "p2", "p3"]
    for p in report["participants"]:
        assert p["receive_only"] is (p["id"] == "p3")
        # Both are the latest over the participant's links: the link to p3, which publishes
        # nothing, can connect after the first frames from p1 and p2 arrived, so no ordering.
        assert 0 < p["connect_ms"] < 5000
        assert 0 < p["first_frame_ms"] < 5000
        assert p["cpu_percent"] > 0
        assert 50 < p["memory_mb"] <= p["memory_peak_mb"] < 1000
        assert p["event_loop"] == "uvloop"  # matrixrtc.event_loop's default
        peers = {x["id"]: x for x in p["peers"]}
        assert set(peers) == set(ids) - {p["id"]}
        for other, peer in peers.items():
            assert peer["decrypt_failures"] == 0
            if other == "p3":  # publishes nothing
                assert peer["frames_decoded"] == 0
                assert peer["kbps_in"] < 10  # RTCP only
                continue
            assert peer["fps_in"] > 10
            assert peer["kbps_in"] > 50
            assert peer["frames_decoded"] > 40
    receiver = report["participants"][2]
    assert all(x["kbps_out"] < 10 for x in receiver["peers"])  # it sent no media
    # the steady-state window: two publishers, four pairs (p3 is nobody's sender)
    w = report["window"]
    assert sorted((x["receiver"], x["sender"]) for x in w["pairs"]) == [
        ("p1", "p2"), ("p2", "p1"), ("p3", "p1"), ("p3", "p2")]  # fmt: skip
    assert w["min_fps_ratio"] > 0.6
    assert [x["receive_only"] for x in w["participants"]] == [False, False, True]
    # the receive-only process decodes two streams and encodes none: the cheapest one
    cpu = {x["id"]: x["cpu_percent"] for x in w["participants"]}
    assert cpu["p3"] < min(cpu["p1"], cpu["p2"])
    assert "[" in err.decode()  # the progress lines went to stderr
    assert "MiB" in err.decode()  # with each participant's memory
    html = page.read_text()
    assert "<script" not in html
    assert html.count("<svg") >= 4 * 2  # fps and decrypt failures (and kbit/s) per pair
    assert "p3 joined" in html
    assert "p1 left" in html
