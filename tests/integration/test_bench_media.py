"""``bench/media.py --json`` at its smallest (2 streams, 2 s): the issue-14 JSON shape, and
figures that say the recorder kept up (0 dropped frames) and the played clip was recorded.

It takes ~28 s under load, more than `make test` can spare: it runs with `make test-media`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.media_matrix]

ROOT = Path(__file__).resolve().parents[2]


async def test_media_bench_json_shape_and_no_dropped_frames() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.media", "--streams", "2", "--seconds", "2", "--json",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out)
    assert set(result) >= {"record", "record_passthrough", "play", "psnr_db", "av_skew_ms"}
    for name in ("record", "record_passthrough"):
        rec = result[name]
        assert rec["streams"] == 2
        assert rec["dropped_frames"] == 0, rec
        assert rec["video_frames_encoded_in_window"] > 0, rec  # the writers did work
        assert rec["cpu_percent_per_stream"] > 0
        assert rec["kbit_per_s_per_stream"] > 0
    assert result["play"]["cpu_percent"] > 0
    assert result["recorded_frames"] > 0, result  # the player's frames reached the recording
    assert isinstance(result["psnr_db"], float)
    assert result["av_skew_ms"] is None or isinstance(result["av_skew_ms"], float)
