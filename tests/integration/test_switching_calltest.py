"""``python -m matrixrtc call-test --transport auto`` end to end: embedded Synapse, LiveKit and
our authorization service, three participant processes joining one after another with
``--mesh-max 2``. The first two start on mesh; the third one's join moves the call to the SFU.
The report says which transport carried each pair and when each participant started or
switched."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest

from matrixrtc.calltest.runner import format_report

pytestmark = pytest.mark.integration


async def test_call_test_auto_switches_to_sfu_above_mesh_max_and_reports_it() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "matrixrtc", "call-test", "--transport", "auto",
        "--mesh-max", "2", "--participants", "3", "--join-interval", "1", "--duration", "8",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    print("\n" + format_report(report))
    assert report["transport"] == "auto"
    parts = {p["id"]: p for p in report["participants"]}
    assert sorted(parts) == ["p1", "p2", "p3"]
    for p in parts.values():
        assert len(p["peers"]) == 2
        for peer in p["peers"]:
            assert peer["transport"] == "sfu", (p["id"], peer)
            assert peer["fps_in"] > 10, (p["id"], peer)
            # A joiner's SFU connection may see a sender's first frames before that sender's
            # key has come over Olm: at most that one entry into MISSING_KEY; >10 fps of
            # decoded frames means decryption works.
            assert peer["decrypt_failures"] <= 1, (p["id"], peer)
    # Joins one after another: the first two start on mesh and move when the third joins,
    # which goes straight onto the SFU.
    for name in ("p1", "p2"):
        moves = [(s["from"], s["to"]) for s in parts[name]["switches"]]
        assert moves == [(None, "mesh"), ("mesh", "sfu")], parts[name]["switches"]
        switch = parts[name]["switches"][1]
        assert switch["reason"] == "3 members > mesh_max 2"
        assert switch["complete"]
    assert [(s["from"], s["to"]) for s in parts["p3"]["switches"]] == [(None, "sfu")]
    table = format_report(report)
    assert table.splitlines()[0].startswith("auto call: 3 participants")
    assert table.splitlines()[1].split()[-1] == "via"
    assert "mesh -> sfu" in table
