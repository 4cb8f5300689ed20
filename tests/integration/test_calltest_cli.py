"""``python -m matrixrtc call-test --json`` end to end: embedded Synapse, two participant
processes, one JSON object with the documented fields."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest

pytestmark = pytest.mark.integration


async def test_call_test_json_report() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "matrixrtc",
        "call-test",
        "--participants",
        "2",
        "--duration",
        "5",
        "--json",
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
    assert ids == ["p1", "p2"]
    for p, other in zip(report["participants"], reversed(ids), strict=True):
        assert 0 < p["connect_ms"] < 5000
        assert p["connect_ms"] <= p["first_frame_ms"] < 5000
        assert p["cpu_percent"] > 0
        (peer,) = p["peers"]
        assert peer["id"] == other
        assert peer["fps_in"] > 10
        assert peer["kbps_in"] > 50
        assert peer["frames_decoded"] > 40
        assert peer["decrypt_failures"] == 0
    assert "[" in err.decode()  # the progress lines went to stderr
